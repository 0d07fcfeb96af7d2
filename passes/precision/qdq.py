"""QDQ emission: x -> QuantizeLinear -> DequantizeLinear (uint8, per tensor) and W as int8 with a
DequantizeLinear (per channel) in front of the layer: the standard form that onnxruntime fuses
into QuantizeLinear + MatMulIntegerToFloat (MatMul) / QLinearConv (Conv) and OpenVINO into its
int8 kernels; any ONNX consumer can run it as written."""

from __future__ import annotations

import numpy as np

from graphopt.ir import ir
from graphopt.passes._weights import add_initializer
from graphopt.passes.precision.ranges import ActRange, quantize_weight
from graphopt.passes.precision.sites import Site
from graphopt.rewrite import RULE_TAG

RULE = "QuantizeLinearInt8"
MIN_OPSET = 13  # per-axis DequantizeLinear


def quantize(graph: ir.Graph, site: Site, act: ActRange) -> None:
    """Rewrite `site` to read dequantized int8 activations and weights."""
    node = site.node
    prefix = site.name
    q, scales = quantize_weight(site.w, site.axis)
    wq = add_initializer(graph, site.weight, q, "int8")
    ws = add_initializer(graph, site.weight, scales, "scale")
    wz = add_initializer(graph, site.weight, np.zeros_like(scales, np.int8), "zero_point")
    xs = add_initializer(graph, site.x, np.array(act.scale, np.float32), "scale")
    xz = add_initializer(graph, site.x, np.array(act.zero_point, np.uint8), "zero_point")
    xq = ir.node("QuantizeLinear", [site.x, xs, xz], name=f"{prefix}_x_quantize")
    xd = ir.node("DequantizeLinear", [xq.outputs[0], xs, xz], name=f"{prefix}_x_dequantize")
    wd = ir.node("DequantizeLinear", [wq, ws, wz], attributes={"axis": site.axis}, name=f"{prefix}_w_dequantize")
    for n in (xq, xd, wd):
        n.metadata_props[RULE_TAG] = RULE
    xd.outputs[0].dtype = ir.DataType.FLOAT
    wd.outputs[0].dtype = ir.DataType.FLOAT
    graph.insert_before(node, [xq, xd, wd])
    node.replace_input_with(0, xd.outputs[0])
    node.replace_input_with(1, wd.outputs[0])
