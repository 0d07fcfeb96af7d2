"""Dynamic-activation int8, the form `onnxruntime.quantization.quantize_dynamic` writes: the
activation's range is read at run time, per tensor, by DynamicQuantizeLinear (uint8, asymmetric,
0 inside the range); the weight is int8 per output channel, as in the static form:

    xq, xs, xz = DynamicQuantizeLinear(x)
    y = Cast(MatMulInteger(xq, Wq, xz, 0), float) * (xs * ws)

Standard ONNX (opset 11); onnxruntime fuses it into DynamicQuantizeMatMul / MatMulIntegerToFloat.
No calibrated range can clip an outlier, and no range can go stale on data unlike the
calibration set, at the price of the range reduction in every call. A candidate per MatMul layer
on onnxruntime targets beside static QDQ (step.py chooses by measured gain per error); OpenVINO
runs static QDQ, so it is not offered under `--target cpu`.
"""

from __future__ import annotations

import numpy as np

from graphopt.calibration import Rows
from graphopt.ir import ir
from graphopt.passes._weights import add_initializer
from graphopt.passes.precision.ranges import fake_weight, quantize_weight
from graphopt.passes.precision.sites import Site
from graphopt.rewrite import RULE_TAG

RULE = "DynamicQuantizeInt8"
MIN_OPSET = 11


def applies(site: Site) -> bool:
    """MatMul with a 2-D constant weight (its output channels on axis 1)."""
    return site.node.op_type == "MatMul" and site.w.ndim == 2


def fake(x: np.ndarray, lo, hi) -> np.ndarray:
    """x through DynamicQuantizeLinear and back, for a tensor whose range is [lo, hi] (scalars, or
    arrays that broadcast against x: one range per row)."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = np.maximum(hi - lo, 1e-8) / 255.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return ((np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)


def local_error(x: Rows, w: np.ndarray, rows: int = 1024, seed: int = 0) -> float:
    """Relative error of x @ W in the dynamic form over the streamed calibration rows: each row
    quantized with its own batch's range (the whole tensor's, as the runtime sees it), read on
    at most `rows` rows of the sample."""
    fake_w = fake_weight(w, 1)
    pick = np.sort(np.random.default_rng(seed).choice(len(x.rows), min(len(x.rows), rows), replace=False))
    sample = x.rows[pick].astype(np.float32)
    lo, hi = x.ranges[x.batch[pick], 0:1], x.ranges[x.batch[pick], 1:2]
    exact = sample @ w
    approx = fake(sample, lo, hi) @ fake_w
    return float(np.linalg.norm(approx - exact) / max(float(np.linalg.norm(exact)), 1e-30))


def layer_nodes(x: str, wq: str, ws: str, wz: str, y: str) -> list:
    """The dynamic form as onnx.helper nodes (gain.py times the layer alone in it)."""
    import onnx.helper as oh

    return [oh.make_node("DynamicQuantizeLinear", [x], ["xq", "xs", "xz"]),
            oh.make_node("MatMulInteger", ["xq", wq, "xz", wz], ["acc"]),
            oh.make_node("Cast", ["acc"], ["accf"], to=1),
            oh.make_node("Mul", ["xs", ws], ["scales"]),
            oh.make_node("Mul", ["accf", "scales"], [y])]


def quantize(graph: ir.Graph, site: Site, shared: dict | None = None) -> None:
    """Rewrite MatMul `site` into the dynamic form; its output value (and readers) stay.
    `shared` (one dict per rewrite, as in qdq.quantize): the layers reading one activation share
    its DynamicQuantizeLinear, so Q, K and V reduce their common input's range once per call."""
    q, scales = quantize_weight(site.w, 1)
    wq = add_initializer(graph, site.weight, q, "int8")
    ws = add_initializer(graph, site.weight, scales, "scale")
    wz = add_initializer(graph, site.weight, np.zeros_like(scales, np.int8), "zero_point")
    prefix = site.name
    shared = {} if shared is None else shared
    made = []
    quant = shared.get(id(site.x))
    if quant is None:  # the first reader quantizes; the later ones read its outputs
        quant = shared[id(site.x)] = ir.node("DynamicQuantizeLinear", [site.x], num_outputs=3,
                                             name=f"{prefix}_x_dynamic_quantize")
        made.append(quant)
    xq, xs, xz = quant.outputs
    integer = ir.node("MatMulInteger", [xq, wq, xz, wz], name=f"{prefix}_matmul_integer")
    cast = ir.node("Cast", [integer.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{prefix}_to_float")
    scale = ir.node("Mul", [xs, ws], name=f"{prefix}_scales")
    out = site.node.outputs[0]
    mul = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=f"{prefix}_dequantize")
    made += [integer, cast, scale, mul]
    for n in made:
        n.metadata_props[RULE_TAG] = RULE
    graph.insert_before(site.node, made)
    mul.outputs[0].type, mul.outputs[0].shape = out.type, out.shape
    name = out.name
    out.replace_all_uses_with(mul.outputs[0], replace_graph_outputs=True)
    graph.remove(site.node, safe=True)
    out.name = f"{name}_float_matmul"
    mul.outputs[0].name = name
