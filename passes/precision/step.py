"""int8 post-training quantization as an approximate step (`precision="int8"`):

1. Calibration data (graphopt/calibration.py): fit and held-out batches, or generated inputs
   with a loud warning.
2. SmoothQuant (smooth.py), an exact re-parameterization: each norm that only linear layers
   read hands per-channel range to their weights; validated equal before any rounding (else
   undone, and the report says so).
3. Per layer (sites.py: MatMul / Gemm / Conv with constant weights): the activation range by
   the layer's own output error among min-max and percentile clips (ranges.py), its local int8
   error, and its measured latency gain alone at its calibrated shape (gain.py). A layer whose
   int8 form is not faster here stays in float.
   Under `--target cpu` (the model runs in OpenVINO) each canonical attention call's products,
   Q K^T and P V, are candidates too (products.py): their ranges by the call's output error,
   their gain measured on the whole model in OpenVINO, with and without them.
4. Selection (select.py): layers ordered by gain per error; the longest prefix whose end-to-end
   mean cosine on the held-out batches stays >= the bound is kept in int8. Nothing meets the
   bound: the model stays float, said so.
   On onnxruntime targets each MatMul also has the dynamic-activation form (dynamic.py, what
   quantize_dynamic writes) as a candidate, with its own local error and measured gain; the
   layer takes the form with the higher gain per error.
5. Emission: standard QuantizeLinear / DequantizeLinear around each kept layer (qdq.py), or
   DynamicQuantizeLinear + MatMulInteger (dynamic.py).
6. Bias correction (bias.py): each kept layer's mean output error per channel on the fit data
   goes into its bias; kept only where it raises the held-out end-to-end cosine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import calibration, fidelity, functions, registry, verify
from graphopt.errors import InputError
from graphopt.ir import common_passes
from graphopt.model import Model
from graphopt.passes.precision import bias, dynamic, gain, products, qdq, ranges, select, smooth
from graphopt.passes.precision.sites import Site, find_sites
from graphopt.shapes import infer_shapes
from graphopt.steps import ApproximateStep, Approximation, Options
from graphopt.passes.precision import details as precision_details

MAX_ROWS = 1024  # rows of each layer's input kept for the range search and local errors


def _rows(x: calibration.Rows, seed: int = 0) -> np.ndarray:
    """At most MAX_ROWS of the streamed sample's rows (a seeded subsample)."""
    rows = x.rows
    if len(rows) > MAX_ROWS:
        rows = rows[np.random.default_rng(seed).choice(len(rows), MAX_ROWS, replace=False)]
    return rows.astype(np.float32)


def quantize(model: Model, options: Options) -> tuple[Model, dict[str, Any]]:
    work = model.clone()
    infer_shapes(work.ir)
    opset = work.ir.opset_imports.get("", 0)
    if opset < qdq.MIN_OPSET:
        raise InputError(f"int8 needs opset >= {qdq.MIN_OPSET} (per-channel DequantizeLinear); the model has {opset}")
    sites = find_sites(work.ir.graph)
    if not sites:
        raise InputError("no layer to quantize: int8 covers MatMul, Gemm and Conv with constant float32 weights")
    data = calibration.split(work, options.calib, seed=options.seed, dims=options.dims)
    references = [verify.run(options.reference_for(model), f) for f in data.held]
    report: dict[str, Any] = {"precision": "int8", "calibration": data.describe()}
    report["smoothing"] = _smooth(work, sites, data, options.calib_rows, options.seed)
    sites = find_sites(work.ir.graph)  # the migration replaced weights (and inputs, for Mul branches)
    sampled = calibration.sample_rows(work, [s.x.name for s in sites], data.fit, capacity=options.calib_rows,
                                      seed=options.seed, progress=options.progress)  # streamed, bounded
    layers, acts, shifts = [], {}, {}
    gains: dict = {}
    where = _measured_in(options)
    dynamic_allowed = _dynamic_allowed(options.int8_form, where, opset)
    report["gain_measured_in"] = where[0] if where[1] is None else f"{where[0]} ({where[1]} for the float form)"
    for group in _by_activation(sites):  # the layers reading one activation share its range (and QuantizeLinear)
        x = sampled[group[0].x.name]
        ws = [None if site.node.op_type == "Conv" else smooth.dense(site) for site in group]  # x @ W form
        if any(w is None for w in ws):  # Conv: min-max range (exact, over every batch), error measured end to end only
            act, errs = ranges.ActRange(min(x.lo, 0.0), max(x.hi, 0.0), "minmax"), [None]
        else:
            act, errs = ranges.best_shared_range(_rows(x), ws)
        for site, w, err in zip(group, ws, errs):
            acts[site.index] = act
            shifts[site.index] = bias.shift(site, [x.rows] if w is not None else [x.first], act, w)
            timed = gain.measure(site, x.first.shape, act, gains, where)
            row = {"index": site.index, "node": site.name, "op": site.node.op_type, "range": act.method, "form": "static",
                   "rel_error": None if err is None else round(err, 6),
                   "float_ms": None if timed is None else round(timed[0], 4),
                   "int8_ms": None if timed is None else round(timed[1], 4),
                   "bias_shift": None if shifts[site.index] is None else round(float(np.abs(shifts[site.index]).max()), 6)}
            if dynamic_allowed and dynamic.applies(site):
                _offer_dynamic(row, site, x, w, gains, where, force=options.int8_form == "dynamic")
                if row["form"] == "dynamic":
                    shifts[site.index] = None
            layers.append(row)
    layers.sort(key=lambda e: e["index"])
    planned: dict[int, tuple] = {}  # attention rows: index -> (qkv ranges, P range)

    def build(count: int, corrected: bool = True, rows: list | None = None) -> Model:
        trial = work.clone()
        chosen = sorted((order[:count] if rows is None else rows), key=lambda e: e["index"])
        trial_sites = {s.name: s for s in find_sites(trial.ir.graph)}
        calls = [e for e in chosen if e["index"] in planned]
        trial_products = {s.name: s for s in products.find_attention_sites(trial.ir.graph)} if calls else {}
        shared: dict = {}
        shared_dynamic: dict = {}
        for e in chosen:  # graph order: a shared quantizer precedes its readers
            if e["index"] in planned:
                products.quantize(trial.ir.graph, trial_products[e["node"]], *planned[e["index"]])
                continue
            site = trial_sites[e["node"]]
            if e.get("form") == "dynamic":
                dynamic.quantize(trial.ir.graph, site, shared_dynamic)
                continue
            qdq.quantize(trial.ir.graph, site, acts[e["index"]], shared)
            if corrected and shifts[e["index"]] is not None:
                bias.correct(trial.ir.graph, site, shifts[e["index"]])
        common_passes.RemoveUnusedNodesPass()(trial.ir)
        if calls:  # the quantized attention's definition in, the plain one out where no call is left
            functions.ensure(trial.ir)
            common_passes.RemoveUnusedFunctionsPass()(trial.ir)
        return trial

    if where[0] == "openvino":  # the attention products: only OpenVINO runs them in int8 (products.py)
        rows = _products(work, data, len(sites), planned, lambda rows: build(0, rows=rows), layers, where)
        layers += rows
        shifts.update({e["index"]: None for e in rows})
        report["attention_products"] = {"calls": len(rows), "timed_as": PRODUCTS_TIMED_AS} if rows else {"calls": 0}
    else:
        report["attention_products"] = {"calls": 0, "why": PRODUCTS_ON_ORT}
    order = select.order(layers, "int8")

    def fid(m: Model) -> dict:
        return fidelity.end_to_end(references, m, data.held)

    best, best_fid = select.longest_prefix(order, lambda count: fid(build(count)), options.fidelity)
    final = build(best)
    corrected = [e["node"] for e in order[:best] if shifts[e["index"]] is not None]
    report["bias_correction"] = {"layers": len(corrected)}
    if corrected:  # held-out data decides whether the correction stays
        plain = build(best, corrected=False)
        plain_fid = fid(plain)
        a, b = fidelity.worst_mean_cosine(best_fid), fidelity.worst_mean_cosine(plain_fid)
        report["bias_correction"].update(mean_cosine_with=round(a, 6), mean_cosine_without=round(b, 6), kept=a >= b)
        if a < b:
            final, best_fid = plain, plain_fid
    select.mark(order, best, "int8", options.fidelity)
    kept = order[:best]
    report["forms"] = {"static": sum(1 for e in kept if e.get("form") != "dynamic"),
                       "dynamic": sum(1 for e in kept if e.get("form") == "dynamic")}
    report["layers"] = layers
    report["end_to_end"] = best_fid if best_fid is not None else fid(final)
    report["selection"] = {"fidelity_bound": options.fidelity, "int8_layers": best, "layers_total": len(layers),
                           "faster_in_int8": len(order)}
    report.update(select.note("int8", best, len(order), options.fidelity))
    return final, report


def _score(saved_ms: float, error: float | None) -> float:
    """Gain per error, as select.order ranks layers."""
    return saved_ms / ((error or 1e-3) + 1e-6)


INT8_FORMS = ("auto", "static", "dynamic")


def _dynamic_allowed(form: str, where: tuple[str, str | None], opset: int) -> bool:
    """Whether the dynamic form is a candidate: on onnxruntime targets (OpenVINO runs static
    QDQ) at opset >= 11, unless the user asked for the static form only."""
    possible = where[0] == "onnxruntime" and opset >= dynamic.MIN_OPSET
    if form == "dynamic" and not possible:
        raise InputError(f"--int8-form dynamic needs an onnxruntime target and opset >= {dynamic.MIN_OPSET} "
                         f"(layers are timed in {where[0]}, the model has opset {opset}); "
                         "use --int8-form static or auto")
    return possible and form != "static"


def _offer_dynamic(row: dict[str, Any], site: Site, x: calibration.Rows, w: np.ndarray, gains: dict, where,
                   force: bool = False) -> None:
    """The dynamic-activation form as the layer's other int8 candidate: its local error on the
    calibration batches and its time alone; the row takes it when its gain per error is higher
    (and it is faster than float), or always when `force` (--int8-form dynamic; the selection
    still leaves a layer float where its int8 form is not faster). Both forms' numbers stay in
    the row."""
    err = dynamic.local_error(x, w)
    timed = gain.measure(site, x.first.shape, gain.DYNAMIC, gains, where)
    row.update(static_int8_ms=row["int8_ms"], static_rel_error=row["rel_error"],
               dynamic_int8_ms=None if timed is None else round(timed[1], 4), dynamic_rel_error=round(err, 6))
    if force or (timed is not None and prefers_dynamic(row, timed[1], err)):
        row.update(form="dynamic", int8_ms=None if timed is None else round(timed[1], 4), rel_error=round(err, 6),
                   range="dynamic (per call)")


def prefers_dynamic(row: dict[str, Any], dynamic_ms: float, dynamic_error: float) -> bool:
    """Whether the dynamic form beats the row's static one: faster than float, and a higher
    gain per error (ms saved / relative error) than the static form's."""
    if row["float_ms"] is None or dynamic_ms >= row["float_ms"]:
        return False
    static = _score(row["float_ms"] - row["int8_ms"], row["rel_error"]) if row["int8_ms"] is not None else float("-inf")
    return _score(row["float_ms"] - dynamic_ms, dynamic_error) > static


PRODUCTS_TIMED_AS = ("the whole model at the calibration shape in OpenVINO, its faster-in-int8 layers in int8, "
                     "with and without every call's products in int8; float_ms / int8_ms are each call's equal share")
PRODUCTS_ON_ORT = ("on onnxruntime the products stay float: its fused attention (lowered later) takes float inputs, "
                   "and the unfused int8 form is slower")


def _products(work: Model, data, first_index: int, planned: dict, build, layers: list[dict], where) -> list[dict]:
    """One report row per attention call whose products can go to int8 (their ranges in `planned`)."""
    sites = products.find_attention_sites(work.ir.graph)
    if not sites:
        return []
    names = sorted({n for s in sites for n in products.capture_names(s)})
    captured = calibration.run_exposed(work, names, data.fit[:1])[0]
    rows = []
    for site in sites:
        qkv, p_range, err = products.choose(site, captured)
        index = first_index + site.index
        planned[index] = (qkv, p_range)
        rows.append({"index": index, "node": site.name, "op": site.node.op_type, "range": "products: Q K^T, P V",
                     "rel_error": round(err, 6), "float_ms": None, "int8_ms": None, "bias_shift": None})
    faster = select.faster(layers, "int8")
    timed = gain.measure_models(build(faster), build(faster + rows), data.fit[0], where)
    for e in rows:
        e["float_ms"], e["int8_ms"] = (round(t / len(rows), 4) for t in timed)
    return rows


def _measured_in(options: Options) -> tuple[str, str | None]:
    """Where layers are timed: under `--target cpu` in OpenVINO, the float form at the precision
    its lowering may use (bf16 where allowed and supported); otherwise in onnxruntime."""
    if options.target != "cpu":
        return "onnxruntime", None
    openvino = registry.runtime("openvino")
    return "openvino", "bf16" if options.precision == "auto" and openvino.supports("bf16") else "fp32"


def _by_activation(sites: list[Site]) -> list[list[Site]]:
    """MatMul / Gemm sites grouped by the activation they read; each Conv alone."""
    grouped = {id(g.readers[0]): g.readers for g in smooth.groups(sites)}
    return [grouped[id(s)] if id(s) in grouped else [s] for s in sites
            if id(s) in grouped or s.node.op_type == "Conv"]


def _smooth(work: Model, sites: list[Site], data, capacity: int = calibration.DEFAULT_ROWS, seed: int = 0) -> dict[str, Any]:
    """Migrate activation range into the weights where it lowers the int8 error; validated equal."""
    groups = smooth.groups(sites)
    if not groups:
        return {"activations": []}
    before = work.clone()
    sampled = calibration.sample_rows(work, [g.x.name for g in groups], data.fit, capacity=capacity, seed=seed)
    done = []
    for g in groups:
        rows = _rows(sampled[g.x.name])
        alpha, s, err = smooth.choose(rows, g)
        how = smooth.apply(work.ir.graph, g, s) if alpha else "not migrated"
        done.append({"activation": g.x.name, "alpha": alpha, "how": how, "readers": [r.name for r in g.readers],
                     "readers_rel_error": round(err, 6)})
    common_passes.RemoveUnusedNodesPass()(work.ir)
    checks = verify.compare_outputs(verify.run(before, data.held[0]), verify.run(work, data.held[0]))
    if not all(c.passed for c in checks):  # an exact re-parameterization that is not exact is undone
        work.ir = before.ir
        return {"activations": [], "undone": f"not equal after migration: {[c.name for c in checks if not c.passed]}"}
    return {"activations": done, "validated_equal": True}


class QuantizeInt8(ApproximateStep):
    """int8 post-training quantization with SmoothQuant re-parameterization and per-layer fallback."""

    name = "quantize-int8"

    def approximate(self, model: Model) -> Approximation:
        quantized, report = quantize(model, self.options)
        counts = {qdq.RULE: report["forms"]["static"], dynamic.RULE: report["forms"]["dynamic"]}
        return Approximation(quantized, {k: v for k, v in counts.items() if v}, report)

    def details(self, report):
        return precision_details.quantized(report, self.options.fidelity)
