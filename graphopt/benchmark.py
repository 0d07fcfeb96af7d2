"""`graphopt bench`: graphopt's output against the original and the anchors, in one process.

Contenders (each an onnxruntime session on the same provider, ORT_ENABLE_ALL):
    graphopt       optimize(preset) + the measured lowering for the target
    original       the model as given
    ort-optimizer  onnxruntime.transformers.optimizer.optimize_model (model_type "bert")
    onnxscript     onnxscript.rewriter.ort_fusions.optimize_for_ort
and, when asked for (--against openvino,openvino-fp32):
    openvino       OpenVINO's default on the original model (its own precision choice: bf16 on
                   CPUs with AVX512-BF16 or AMX)
    openvino-fp32  OpenVINO on the original with the fp32 precision hint
With target "cpu", graphopt's contender runs where `optimize(target="cpu")` chose (onnxruntime
or OpenVINO, with its precision hint).
A contender that fails to build or to run is reported with its error, not dropped
silently. Every contender's outputs are compared with the original's before timing.
Timing is interleaved (one call of each per round); medians and ratios are reported.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphopt import exporters, feeds as feeds_mod, importers, registry, runtimes, sessions, timing, verify
from graphopt.errors import InputError, first_line
from graphopt.model import Model

ANCHORS = ("original", "ort-optimizer", "onnxscript")  # the default contenders
OPTIONAL = ("openvino", "openvino-fp32")  # timed when named in `against`


@dataclasses.dataclass
class Contender:
    name: str
    median_ms: float | None = None
    speedup: float | None = None  # original median / this median
    max_abs_error: float | None = None  # against the original's outputs
    min_cosine: float | None = None  # the lowest per-row cosine to the original's float outputs
    error: str | None = None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BenchResult:
    target: str
    inputs: dict[str, list[int]]
    rounds: int
    contenders: list[Contender]
    report: Any = None  # graphopt's optimize report, when it optimized here (for `bench --report page.html`)

    @property
    def graphopt_vs_best_anchor(self) -> float | None:
        ours = next((c for c in self.contenders if c.name == "graphopt" and c.median_ms), None)
        anchors = [c.median_ms for c in self.contenders if c.name != "graphopt" and c.median_ms]
        return round(min(anchors) / ours.median_ms, 3) if ours and anchors else None

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "inputs": self.inputs, "rounds": self.rounds,
                "contenders": [c.to_dict() for c in self.contenders], "graphopt_vs_best_anchor": self.graphopt_vs_best_anchor}


def bench(model: Any, *, target: str = "ort-cpu", against: Sequence[str] = ANCHORS, inputs: Any = None,
          dims: Mapping[str, int] | None = None, rounds: int = 30, preset: str | None = None,
          optimized: Any = None, tvm_artifact: str | None = None, precision: str | None = None,
          fidelity: float = 0.99) -> BenchResult:
    """Time graphopt's output for `target` against `against`. `optimized`: an already
    optimized model to use as the graphopt contender (else `optimize` runs here), or a mapping
    {contender name: model} to time several;
    `tvm_artifact`: a compiled TVM artifact timed as one more contender ("tvm").
    `precision`, `fidelity`: what graphopt's optimize may use (target "cpu")."""
    from graphopt.backends.ort import select as ort_select

    unknown = sorted(set(against) - set(ANCHORS) - set(OPTIONAL))
    if unknown:
        raise InputError(f"unknown contender(s) {', '.join(unknown)}", hint=f"choose from {', '.join(ANCHORS + OPTIONAL)}")
    provider = sessions.CPU if target == "cpu" else ort_select.provider_for(target)
    source = importers.load(model)
    feeds, _ = verify.resolve_inputs(source, inputs, dims=dims)
    builders: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
        **({name: (lambda m=m: _graphopt(source, m, feeds, target, preset, provider, precision, fidelity))
            for name, m in optimized.items()} if isinstance(optimized, Mapping) else
           {"graphopt": lambda: _graphopt(source, optimized, feeds, target, preset, provider, precision, fidelity)}),
        "original": lambda: (sessions.session_for(_bytes(source), provider, disabled=()), {}),
        "ort-optimizer": lambda: _ort_optimizer(source, provider),
        "onnxscript": lambda: _onnxscript(source, provider),
        "tvm": lambda: (_tvm_executable(tvm_artifact), {"artifact": str(tvm_artifact)}),
        "openvino": lambda: _openvino(source, None),
        "openvino-fp32": lambda: _openvino(source, "fp32"),
    }
    ours = list(optimized) if isinstance(optimized, Mapping) else ["graphopt"]
    names = [*ours, *(["tvm"] if tvm_artifact else []), *[a for a in ANCHORS + OPTIONAL if a in against]]
    if "original" not in names:
        names.append("original")  # the reference for errors and ratios
    contenders, runners, reference, report = [], {}, None, None
    for name in names:
        contender = Contender(name)
        contenders.append(contender)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                session, contender.detail = builders[name]()
            report = contender.detail.pop("report", None) or report
            outputs = session.run(feeds)
        except Exception as exc:  # an anchor that breaks is a result, not a crash
            contender.error = first_line(exc, 300)
            continue
        runners[name] = session
        if name == "original":
            reference = outputs
        contender.detail["outputs"] = outputs
    for contender in contenders:
        outputs = contender.detail.pop("outputs", None)
        if outputs is not None and reference is not None:
            contender.max_abs_error = float(max((np.max(np.abs(np.asarray(reference[k], np.float64) - np.asarray(v, np.float64)))
                                                 for k, v in outputs.items() if k in reference), default=0.0))
            contender.min_cosine = verify.min_cosine(reference, outputs)
    medians = timing.medians(timing.interleaved({n: (lambda s=s: s.run(feeds)) for n, s in runners.items()}, rounds=rounds))
    base = medians.get("original")
    for contender in contenders:
        if contender.name in medians:
            contender.median_ms = round(medians[contender.name] * 1e3, 3)
            contender.speedup = round(base / medians[contender.name], 3) if base else None
    return BenchResult(target, feeds_mod.shapes(feeds), rounds, contenders, report)


def _tvm_executable(path):
    return registry.runtime("tvm").load(path)


def _bytes(model: Model) -> bytes:
    return exporters.to_proto(model).SerializeToString()


def _graphopt(source: Model, optimized: Any, feeds, target: str, preset: str | None, provider: str,
              precision: str | None, fidelity: float):
    from graphopt.optimizer import optimize

    if optimized is None:
        result = optimize(source, inputs=feeds, target=target, precision=precision, fidelity=fidelity,
                          **({"preset": preset} if preset else {}))
        model, detail = result.model, {"lowering": result.report.lowering, "rewrites": result.report.rewrites(),
                                       "report": result.report}
    else:
        model, detail = importers.load(optimized), {}
    runtime, meant = runtimes.runtime_for(model)
    detail["runtime"] = runtime.name + (f" {meant}" if meant else "")
    return runtime.compile(model, meant, provider=provider), detail


def _openvino(model: Model, precision: str | None):
    openvino = registry.runtime("openvino")
    return openvino.compile(model, precision), {"precision": precision or openvino.default_precision()}


def _ort_optimizer(source: Model, provider: str):
    import tempfile
    from pathlib import Path

    from onnxruntime.transformers import optimizer


    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:
        path = exporters.save(source.clone(), Path(tmp) / "model.onnx")
        optimized = optimizer.optimize_model(str(path), model_type="bert", num_heads=0, hidden_size=0)
        out = Path(tmp) / "optimized.onnx"
        optimized.save_model_to_file(str(out), use_external_data_format=source.parameter_bytes() > exporters.PROTOBUF_LIMIT)
        session = sessions.session_for(str(out), provider, disabled=())
    fused = optimized.get_fused_operator_statistics()
    return session, {"fused": {k: v for k, v in fused.items() if v}}


def _onnxscript(source: Model, provider: str):
    from onnxscript.rewriter import ort_fusions


    model, counts = ort_fusions.optimize_for_ort(source.clone().ir)
    return sessions.session_for(_bytes(Model(model)), provider, disabled=()), {"fused": {k: v for k, v in counts.items() if v}}


def format_rows(result: BenchResult) -> list[tuple[str, ...]]:
    rows = []
    for c in result.contenders:
        if c.error:
            rows.append((c.name, "-", "-", "-", f"failed: {c.error}"))
        else:
            rows.append((c.name, f"{c.median_ms:.2f}", f"{c.speedup:.2f}x" if c.speedup else "-",
                         f"{c.max_abs_error:.1e}" if c.max_abs_error is not None else "-",
                         f"min cosine {c.min_cosine:.6f}" if c.min_cosine is not None else ""))
    return rows


__all__ = ["ANCHORS", "OPTIONAL", "BenchResult", "Contender", "bench", "format_rows"]
