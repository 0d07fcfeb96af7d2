"""Numeric validation: run models in onnxruntime and compare their outputs.

Public: tests and users share it. Runs use the CPU execution provider with ORT's
own graph optimizations off. Tolerances are per dtype and normwise:

    max |candidate - reference| <= atol + rtol * max |reference|     (per output)

Why normwise and not elementwise: an exact rewrite re-associates float sums, and
the rounding of a sum scales with the magnitude of its terms, not of its result.
Measured on a 4-block RepVGG-style convnet (fp32, unit-scale inputs): the original
model itself is 1.0e-6 away from a float64 evaluation and the branch-merged one
1.7e-6, at an element where cancellation left |reference| near 0; elementwise
`atol=1e-6` would reject the exact rewrite while the original fails it too.
`max_rel_error` is the same normwise ratio, max |error| / max |reference|.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from graphopt import exporters, feeds as feeds_mod, fitting, importers
from graphopt import sessions as ort_backend
from graphopt.errors import BackendError, first_line
from graphopt.model import Model

# (rtol, atol) per dtype: fp32 is tight enough that a wrong rewrite cannot hide.
TOLERANCES: Mapping[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-9),
    "float32": (1e-5, 1e-6),
    "float16": (1e-3, 1e-3),
    "bfloat16": (1e-2, 1e-2),
}


def tolerance_for(dtype: np.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing outputs of `dtype`; (0, 0) for exact dtypes."""
    return TOLERANCES.get(np.dtype(dtype).name, (0.0, 0.0))


@dataclasses.dataclass
class OutputCheck:
    name: str
    dtype: str
    shape: list[int]
    max_abs_error: float
    max_rel_error: float
    cosine: float
    rtol: float
    atol: float
    passed: bool
    note: str = ""


@dataclasses.dataclass
class Validation:
    outputs: list[OutputCheck]
    inputs: dict[str, list[int]]
    input_source: str  # "generated (seed N)" or the user's
    seed: int | None = None

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def failures(self) -> list[OutputCheck]:
        return [o for o in self.outputs if not o.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "input_source": self.input_source,
            "inputs": self.inputs,
            "outputs": [dataclasses.asdict(o) for o in self.outputs],
        }


def run(model: Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of `model` on `feeds`, by output name (ORT CPU, no ORT graph optimizations).
    The large weights are fed by reference (exporters.ort_weightless): the session holds the
    graph, not a second copy of the weights."""
    with exporters.ort_weightless(model) as (loadable, weights):
        return ort_backend.session(loadable).run({**feeds, **weights})


def load_problem(model: Model, *, runtime: bool = True, checker: bool = True) -> str | None:
    """Why `model` would not load in an ONNX consumer, or None: onnx.checker's full check
    (types and shapes inferred strictly), then, with `runtime`, an onnxruntime session. Only
    the graph is serialized (large weights become graph inputs), so this is cheap enough to
    run after every step whose numbers cannot be compared."""
    with exporters.ort_weightless(model) as (loadable, _):
        try:
            if checker:
                onnx.checker.check_model(loadable, full_check=True)
        except Exception as exc:  # onnx raises ValidationError, InferenceError and others
            return f"onnx.checker refuses it: {first_line(exc)}"
        if runtime:
            try:
                ort_backend.session(loadable)
            except BackendError as exc:
                return str(exc).rstrip(".")
    return None


def resolve_inputs(
    model: Model, inputs: Any = None, *, seed: int = 0, dims: Mapping[str, int] | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """Feeds from an .npz path, a dict of arrays, or seeded generation at sizes the model runs
    at (graphopt/fitting.py); with a description."""
    if inputs is None:
        found = fitting.fit(model, run, seed=seed, dims=dims)
        return found.feeds, found.describe(seed)
    if isinstance(inputs, (str, os.PathLike)):
        return feeds_mod.load_inputs(inputs, model), os.fspath(inputs)
    arrays = {k: np.asarray(v) for k, v in inputs.items()}
    feeds_mod.check_inputs(arrays, model)
    return arrays, "user arrays"


def validate(
    reference: Any,
    candidate: Any,
    inputs: Any = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    runtime: str = "onnxruntime",
) -> Validation:
    """Run `reference` and `candidate` on the same inputs and compare every output.

    reference/candidate: anything `graphopt.load` accepts. inputs: None (seeded
    generation, symbolic dims bound from `dims`, default batch=1, seq=128), an
    `.npz` path, or a dict of arrays. rtol/atol override the per-dtype defaults.
    runtime: where the candidate runs: "onnxruntime" (like the reference, in a validation
    session), or any registered runtime at fp32 (graphopt.runtimes; "openvino": made portable,
    the fp32 hint): the candidate there against the reference in onnxruntime.
    """
    ref_model, cand_model = importers.load(reference), importers.load(candidate)
    feeds, source = resolve_inputs(ref_model, inputs, seed=seed, dims=dims)
    if runtime == "onnxruntime":
        got = run(cand_model, feeds)
    else:
        from graphopt import registry  # the registry loads the runtime packages

        target = registry.runtime(runtime)
        shapes = {"shapes": feeds_mod.shapes(feeds)} if target.needs_shapes else {}  # TVM compiles for static shapes
        got = target.compile(cand_model, "fp32", **shapes).run(feeds)
    checks = compare_outputs(run(ref_model, feeds), got, rtol=rtol, atol=atol)
    return Validation(checks, feeds_mod.shapes(feeds), source, seed if inputs is None else None)


def min_cosine(reference: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> float:
    """The lowest per-row cosine (rows: the leading axis) over the float outputs both have."""
    worst = 1.0
    for name, ref in reference.items():
        ref = np.asarray(ref)
        if name not in got or ref.dtype.kind != "f" or ref.size == 0:
            continue
        a = ref.astype(np.float64).reshape(ref.shape[0] if ref.ndim else 1, -1)
        b = np.asarray(got[name], np.float64).reshape(a.shape)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        worst = min(worst, round(float(cos.min()), 6))
    return worst


def compare_outputs(
    reference: Mapping[str, Any], candidate: Mapping[str, Any], *, rtol: float | None = None, atol: float | None = None
) -> list[OutputCheck]:
    """Per-output comparison by name; a missing candidate output fails."""
    checks = []
    for name, ref in reference.items():
        if name not in candidate:
            checks.append(_failed(name, ref, f"output '{name}' is missing from the candidate"))
            continue
        checks.append(compare_arrays(name, ref, candidate[name], rtol=rtol, atol=atol))
    return checks


def compare_arrays(name: str, reference: Any, candidate: Any, *, rtol: float | None = None, atol: float | None = None) -> OutputCheck:
    if isinstance(reference, list):  # sequence outputs: compare element by element
        parts = [compare_arrays(f"{name}[{i}]", r, c, rtol=rtol, atol=atol) for i, (r, c) in enumerate(zip(reference, candidate or []))]
        ok = len(reference) == len(candidate or []) and all(p.passed for p in parts)
        worst = max(parts, key=lambda p: p.max_abs_error, default=None)
        return OutputCheck(name, "sequence", [len(reference)], worst.max_abs_error if worst else 0.0, worst.max_rel_error if worst else 0.0,
                           min((p.cosine for p in parts), default=1.0), worst.rtol if worst else 0.0, worst.atol if worst else 0.0, ok)
    ref, cand = np.asarray(reference), np.asarray(candidate)
    default_rtol, default_atol = tolerance_for(ref.dtype)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    if ref.shape != cand.shape:
        return _failed(name, ref, f"shape {list(cand.shape)} differs from reference {list(ref.shape)}")
    if ref.dtype != cand.dtype:
        return _failed(name, ref, f"dtype {cand.dtype} differs from reference {ref.dtype}")
    if ref.dtype.kind not in "fc":
        equal = bool(np.array_equal(ref, cand))
        return OutputCheck(name, str(ref.dtype), list(ref.shape), 0.0 if equal else float("inf"), 0.0 if equal else float("inf"),
                           1.0 if equal else 0.0, 0.0, 0.0, equal, "" if equal else "values differ (exact dtype)")
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    same_special = np.array_equal(np.isnan(r), np.isnan(c)) and np.array_equal(r[np.isinf(r)], c[np.isinf(r)]) and np.array_equal(np.isinf(r), np.isinf(c))
    finite = np.isfinite(r) & np.isfinite(c)
    diff = np.abs(r - c)[finite]
    scale = float(np.abs(r)[finite].max()) if diff.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    within = max_abs <= atol + rtol * scale
    note = "" if same_special else "NaN/Inf positions differ"
    return OutputCheck(name, str(ref.dtype), list(ref.shape), max_abs, max_rel, _cosine(r[finite], c[finite]), rtol, atol,
                       within and same_special, note)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb))


def _failed(name: str, ref: Any, note: str) -> OutputCheck:
    arr = np.asarray(ref) if not isinstance(ref, list) else np.zeros(0)
    return OutputCheck(name, str(arr.dtype), list(arr.shape), float("inf"), float("inf"), 0.0, 0.0, 0.0, False, note)
