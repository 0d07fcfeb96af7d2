"""QDQ emission: x -> QuantizeLinear -> DequantizeLinear (uint8, per tensor) and W as int8 with a
DequantizeLinear (per channel) in front of the layer: the standard form that onnxruntime fuses
into QuantizeLinear + MatMulIntegerToFloat (MatMul) / QLinearConv (Conv) and OpenVINO into its
int8 kernels; any ONNX consumer can run it as written.

Layers reading one activation share its QuantizeLinear (one range per activation: ranges.py).
A SmoothQuant Mul(x, 1 / s) in front stays a Mul: folding it into a per-channel
QuantizeLinear scale is exact and standard ONNX, but OpenVINO refuses per-channel activation
quantization and onnxruntime 1.32's per-axis QuantizeLinear made MiniLM int8 four times slower
(58.8 vs 15 ms at batch 1, measured 2026-12-01), so it was tried and dropped."""

from __future__ import annotations

import numpy as np

from graphopt.ir import ir
from graphopt.passes._weights import add_initializer
from graphopt.passes.precision.ranges import ActRange, quantize_weight
from graphopt.passes.precision.sites import Site
from graphopt.rewrite import RULE_TAG

RULE = "QuantizeLinearInt8"
MIN_OPSET = 13  # per-axis DequantizeLinear


def quantize(graph: ir.Graph, site: Site, act: ActRange, shared: dict | None = None) -> None:
    """Rewrite `site` to read dequantized int8 activations and weights. `shared` (one dict per
    graph) lets the layers that read one activation share its QuantizeLinear."""
    node = site.node
    prefix = site.name
    q, scales = quantize_weight(site.w, site.axis)
    wq = add_initializer(graph, site.weight, q, "int8")
    ws = add_initializer(graph, site.weight, scales, "scale")
    wz = add_initializer(graph, site.weight, np.zeros_like(scales, np.int8), "zero_point")
    wd = ir.node("DequantizeLinear", [wq, ws, wz], attributes={"axis": site.axis}, name=f"{prefix}_w_dequantize")
    wd.outputs[0].dtype = ir.DataType.FLOAT
    shared = {} if shared is None else shared
    xq = shared.get(id(site.x))  # one QuantizeLinear per activation; a DequantizeLinear per reader
    made = [wd]                  # (onnxruntime fuses a DequantizeLinear into one reader only)
    if xq is None:
        xq = shared[id(site.x)] = _quantize(graph, site, act)
        made.insert(0, xq)
    xd = ir.node("DequantizeLinear", [xq.outputs[0], *xq.inputs[1:]], name=f"{prefix}_x_dequantize")
    xd.outputs[0].dtype = ir.DataType.FLOAT
    made.insert(-1, xd)
    for n in made:
        n.metadata_props[RULE_TAG] = RULE
    graph.insert_before(node, made)
    node.replace_input_with(0, xd.outputs[0])
    node.replace_input_with(1, wd.outputs[0])


def _quantize(graph: ir.Graph, site: Site, act: ActRange) -> ir.Node:
    xs = add_initializer(graph, site.x, np.array(act.scale, np.float32), "scale")
    xz = add_initializer(graph, site.x, np.array(act.zero_point, np.uint8), "zero_point")
    return ir.node("QuantizeLinear", [site.x, xs, xz], name=f"{site.name}_x_quantize")
