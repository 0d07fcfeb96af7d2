"""int4 weight-only MatMul (`precision="int4"`, onnxruntime targets): onnxruntime's contrib op
MatMulNBits with blocks of 32 weights sharing one float scale, computed with int8 activations
(accuracy_level 4), for the MatMuls whose int4 form is measured faster here.

Math (W [K, N] as x @ W; per output column n and block b of 32 rows):
    s[n, b] = max |W[b, n]| / 7,  q = clip(round(W / s) + 8, 0, 15),  W~ = (q - 8) s
Packing (MatMulNBits' layout): B [N, blocks, 16] uint8, two weights per byte, the even row in
the low nibble; scales [N * blocks]; no zero points (the op's default for 4 bits is 8).
Preconditions:
    1. A MatMul with a constant float32 2-D weight (decoders' projections; Gemm and Conv stay).
    2. The target is onnxruntime (`--target ort-cpu` / `ort-cuda`): MatMulNBits is a contrib op
       no other consumer loads.
Selection: select.py, as for int8: layers faster in int4 alone at their calibrated shape, by gain
per local error, the longest prefix whose held-out end-to-end mean cosine meets the bound.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx.helper as oh

from graphopt import calibration, fidelity, ops, timing, verify
from graphopt.errors import InputError
from graphopt.ir import common_passes, ir
from graphopt.model import Model
from graphopt.passes._weights import add_initializer
from graphopt.passes.precision import select
from graphopt.passes.precision.sites import Site, find_sites
from graphopt.rewrite import RULE_TAG
from graphopt.shapes import infer_shapes
from graphopt.steps import ApproximateStep, Approximation, Options
from graphopt.passes.precision import details as precision_details

RULE = "MatMulNBitsInt4"
BLOCK = 32
ACCURACY_LEVEL = 4  # int8 compute of the activations (the fast path on x64)
ROUNDS = 20


def quantize_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q [N, blocks, BLOCK] in 0..15, scales [N, blocks]) for W [K, N]; K padded with zeros."""
    k, n = w.shape
    blocks = -(-k // BLOCK)
    padded = np.zeros((blocks * BLOCK, n), np.float32)
    padded[:k] = w
    cols = padded.T.reshape(n, blocks, BLOCK)
    scales = np.maximum(np.abs(cols).max(-1) / 7.0, 1e-12).astype(np.float32)
    q = np.clip(np.round(cols / scales[..., None]) + 8, 0, 15).astype(np.uint8)
    return q, scales


def fake(w: np.ndarray) -> np.ndarray:
    """W~: what the int4 layer multiplies by (float32, [K, N])."""
    q, scales = quantize_blocks(w)
    cols = (q.astype(np.float32) - 8) * scales[..., None]
    return cols.reshape(w.shape[1], -1).T[: w.shape[0]]


def pack(q: np.ndarray) -> np.ndarray:
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _node_parts(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    q, scales = quantize_blocks(w)
    attrs = {"K": w.shape[0], "N": w.shape[1], "bits": 4, "block_size": BLOCK, "accuracy_level": ACCURACY_LEVEL}
    return pack(q), scales.reshape(-1), attrs


def emit(graph: ir.Graph, site: Site) -> None:
    """Replace the site's MatMul by MatMulNBits on the packed weight."""
    packed, scales, attrs = _node_parts(site.w)
    b = add_initializer(graph, site.weight, packed, "int4")
    s = add_initializer(graph, site.weight, scales, "int4_scales")
    node = ir.node("MatMulNBits", [site.x, b, s], attributes=attrs, domain=ops.ORT_CONTRIB_DOMAIN,
                   name=f"{site.name}_int4")
    node.metadata_props[RULE_TAG] = RULE
    graph.insert_before(site.node, [node])
    out = node.outputs[0]
    old = site.node.outputs[0]
    out.type, out.shape = old.type, old.shape
    if old.is_graph_output():
        name = old.name
        old.name, out.name = f"{name}_float", name
        graph.outputs[[i for i, v in enumerate(graph.outputs) if v is old][0]] = out
    for reader, index in list(old.uses()):
        reader.replace_input_with(index, out)
    graph.remove(site.node, safe=True)
    if ops.ORT_CONTRIB_DOMAIN not in graph.opset_imports:
        graph.opset_imports[ops.ORT_CONTRIB_DOMAIN] = 1


def _layer(w: np.ndarray, x_shape, int4: bool) -> bytes:
    import onnx.numpy_helper as nh

    if int4:
        packed, scales, attrs = _node_parts(w)
        inits = [nh.from_array(packed, "B"), nh.from_array(scales, "S")]
        node = oh.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain=ops.ORT_CONTRIB_DOMAIN, **attrs)
    else:
        inits = [nh.from_array(np.ascontiguousarray(w), "W")]
        node = oh.make_node("MatMul", ["x", "W"], ["y"])
    graph = oh.make_graph([node], "layer", [oh.make_tensor_value_info("x", 1, list(x_shape))],
                          [oh.make_tensor_value_info("y", 1, None)], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid(ops.ORT_CONTRIB_DOMAIN, 1)],
                         ir_version=8).SerializeToString()


def measure(w: np.ndarray, x_shape, cache: dict) -> tuple[float, float]:
    """(float ms, int4 ms) of the layer alone at `x_shape` in onnxruntime (interleaved)."""
    from graphopt.sessions import session_for

    key = (tuple(x_shape), w.shape)
    if key not in cache:
        x = {"x": np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
        sessions = {k: session_for(_layer(w, x_shape, k == "int4"), disabled=()) for k in ("float", "int4")}
        medians = timing.medians(timing.interleaved({k: (lambda s=s: s.run(x)) for k, s in sessions.items()}, rounds=ROUNDS))
        cache[key] = (medians["float"] * 1e3, medians["int4"] * 1e3)
    return cache[key]


def quantize(model: Model, options: Options) -> tuple[Model, dict[str, Any]]:
    if not (options.target or "").startswith("ort-"):
        raise InputError("int4 (MatMulNBits) is an onnxruntime contrib op that other consumers do not load",
                         hint="add --target ort-cpu, or use --precision int8 for a portable file")
    work = model.clone()
    infer_shapes(work.ir)
    sites = [s for s in find_sites(work.ir.graph) if s.node.op_type == "MatMul"]
    if not sites:
        raise InputError("no layer for int4: it covers MatMul with a constant float32 2-D weight")
    data = calibration.split(work, options.calib, seed=options.seed, dims=options.dims)
    references = [verify.run(options.reference_for(model), f) for f in data.held]
    captured = calibration.run_exposed(work, [s.x.name for s in sites], data.fit[:1])
    layers, cache = [], {}
    for site in sites:
        x = captured[0][site.x.name]
        rows = x.reshape(-1, site.w.shape[0])[:1024]
        exact = rows @ site.w
        err = float(np.linalg.norm(rows @ fake(site.w) - exact) / (np.linalg.norm(exact) + 1e-30))
        float_ms, int4_ms = measure(site.w, x.shape, cache)
        layers.append({"index": site.index, "node": site.name, "op": "MatMul", "rel_error": round(err, 6),
                       "float_ms": round(float_ms, 4), "int4_ms": round(int4_ms, 4)})
    order = select.order(layers, "int4")

    def build(count: int) -> Model:
        trial = work.clone()
        by_name = {s.name: s for s in find_sites(trial.ir.graph)}
        for e in order[:count]:
            emit(trial.ir.graph, by_name[e["node"]])
        common_passes.RemoveUnusedNodesPass()(trial.ir)
        return trial

    best, best_fid = select.longest_prefix(
        order, lambda count: fidelity.end_to_end(references, build(count), data.held), options.fidelity)
    select.mark(order, best, "int4", options.fidelity)
    final = build(best)
    report: dict[str, Any] = {"precision": "int4", "calibration": data.describe(), "layers": layers,
                              "end_to_end": best_fid if best_fid is not None else fidelity.end_to_end(references, final, data.held),
                              "selection": {"fidelity_bound": options.fidelity, "int4_layers": best,
                                            "layers_total": len(sites), "faster_in_int4": len(order)},
                              **select.note("int4", best, len(order), options.fidelity)}
    return final, report


class QuantizeInt4(ApproximateStep):
    """int4 weight-only MatMulNBits for the MatMuls measured faster, under the fidelity bound."""

    name = "quantize-int4"

    def approximate(self, model: Model) -> Approximation:
        quantized, report = quantize(model, self.options)
        return Approximation(quantized, {RULE: report["selection"]["int4_layers"]}, report)

    def details(self, report):
        return precision_details.quantized(report, self.options.fidelity)
