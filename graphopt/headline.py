"""The result of a run in one line, what the CLI's summary and the report page open with:
the speed-up on the runtime the model is meant for, the fidelity on held-out data, the
runtime and precision, the weights' size before and after.

    timing = headline.measure(source, optimized, feeds)   # both timed, interleaved, one process
    result = headline.build(report.to_dict(), timing, runtime, precision)  # {"speedup", "fidelity", ...}
    headline.line(result)  # "1.42x faster in onnxruntime (int8): 12.40 -> 8.73 ms at input_ids [16, 48]; ..."

`build` reads the report alone (a JSON written earlier gives the same headline); the timing is
the one thing it cannot read there, so `measure` runs the source in a default onnxruntime
session (what the user had) and the optimized model where its metadata says it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from graphopt import ops, runtimes, timing
from graphopt.ir import ir
from graphopt.model import Model

ROUNDS = 10
REDUCED = {ops.QUANTIZE_LINEAR: "int8", ops.DYNAMIC_QUANTIZE_LINEAR: "int8", ops.MATMUL_NBITS: "int4"}


def measure(source: Model, optimized: Model, feeds: Mapping[str, np.ndarray], rounds: int = ROUNDS) -> dict[str, Any]:
    """Median ms of the source (a default onnxruntime session) and of the optimized model (in
    the runtime its metadata names), interleaved on `feeds`."""
    runtime, _ = runtimes.meant_for(optimized)
    before = runtimes.executable_for(source)
    after = runtimes.executable_for(optimized)
    medians = timing.medians(timing.interleaved({"before": lambda: before.run(feeds), "after": lambda: after.run(feeds)},
                                                rounds=rounds, warmup=2))
    return {"before_ms": round(medians["before"] * 1e3, 3), "after_ms": round(medians["after"] * 1e3, 3),
            "measured_in": runtime, "inputs": {k: list(np.shape(v)) for k, v in feeds.items()}, "rounds": rounds}


def precision_of(model: Model) -> str:
    """The precision the model computes its linear layers in: int8 / int4 where quantizers are
    in the graph, the metadata's (OpenVINO's hint), bf16 / fp16 where the weights are, else fp32."""
    found = set()
    for node in ir.traversal.RecursiveGraphIterator(model.ir.graph):
        name = REDUCED.get((ops.normalize_domain(node.domain), node.op_type))
        if name:
            found.add(name)
    if found:
        return "+".join(sorted(found))
    _, hinted = runtimes.meant_for(model)
    if hinted:
        return hinted
    dtypes = {v.const_value.dtype for v in model.ir.graph.initializers.values() if v.const_value is not None}
    for dtype, name in ((ir.DataType.BFLOAT16, "bf16"), (ir.DataType.FLOAT16, "fp16")):
        if dtype in dtypes:
            return name
    return "fp32"


def build(report: Mapping[str, Any], measured: Mapping[str, Any] | None, runtime: str, precision: str) -> dict[str, Any]:
    """The headline's fields from a report's JSON (`Report.to_dict()`) and a `measure` result."""
    before, after = report["model"]["before"], report["model"]["after"]
    out: dict[str, Any] = {"runtime": runtime, "precision": precision, "bytes_before": before["param_bytes"],
                           "bytes_after": after["param_bytes"], "fidelity": _fidelity(report)}
    if measured:
        out.update(measured, speedup=round(measured["before_ms"] / max(measured["after_ms"], 1e-9), 3))
    return out


def _fidelity(report: Mapping[str, Any]) -> dict[str, Any]:
    """The last approximate step's end-to-end numbers on held-out data (under one budget: against
    the model before the first approximate step), else the exact validation's."""
    for step in reversed(report["steps"]):
        fid = step.get("fidelity") or {}
        ends = fid.get("end_to_end") or (step.get("details") or {}).get("end_to_end")
        if step["kind"] == "approximate" and step["status"] in ("applied", "no-op") and ends:
            held = (fid.get("calibration") or {}).get("held_out_rows")
            return {"kind": "approximate", "step": step["name"], "held_out_rows": held,
                    "mean_cosine": round(min(e["mean_cosine"] for e in ends.values()), 6),
                    "min_cosine": round(min(e["min_cosine"] for e in ends.values()), 6),
                    "bound": (step.get("details") or {}).get("bound")}
    validation = report.get("validation")
    if validation:
        worst = max((c.get("max_abs_error") or 0.0 for c in validation.get("outputs", [])), default=0.0)
        return {"kind": "exact", "passed": validation["passed"], "max_abs_error": worst}
    return {"kind": "unchecked"}


def line(result: Mapping[str, Any]) -> str:
    """The headline as one sentence."""
    parts = []
    where = f"{result['runtime']} ({result['precision']})"
    if "speedup" in result:
        shapes = ", ".join(f"{k} {v}" for k, v in result["inputs"].items())
        speed = (f"{result['speedup']:.2f}x faster" if result["speedup"] >= 1 else
                 f"{1 / max(result['speedup'], 1e-9):.2f}x slower")
        parts.append(f"{speed} in {where}: {result['before_ms']:.2f} -> {result['after_ms']:.2f} ms at {shapes}")
    else:
        parts.append(f"runs in {where} (not timed)")
    fid = result["fidelity"]
    if fid["kind"] == "approximate":
        held = f" on {fid['held_out_rows']} held-out examples" if fid.get("held_out_rows") else ""
        bound = f" (bound {fid['bound']})" if fid.get("bound") is not None else ""
        parts.append(f"fidelity{held}: mean cosine {fid['mean_cosine']:.4f}, min {fid['min_cosine']:.4f}{bound}")
    elif fid["kind"] == "exact":
        parts.append(f"outputs equal ({'passed' if fid['passed'] else 'FAILED'}, max abs error {fid['max_abs_error']:.1e})")
    else:
        parts.append("outputs not checked")
    parts.append(f"weights {_size(result['bytes_before'])} -> {_size(result['bytes_after'])}")
    return "; ".join(parts)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
