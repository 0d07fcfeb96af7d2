"""onnxruntime contrib ops written as standard ONNX, where an exact standard form exists.

ORT-optimized graphs (the output of onnxruntime's graph optimizer, saved; some shipped models
are) hold `com.microsoft` ops that only onnxruntime runs. `make-portable` converts those with a
standard form here; `summary.nonstandard_note` names the rest. Each converter is one identity:

    FastGelu(x[, b])                       = Gelu(x + b, approximate="tanh")           (opset >= 20)
    Gelu(x), BiasGelu(x, b)                = Gelu(x [+ b])                             (opset >= 20)
    QuickGelu(x, alpha)                    = x * Sigmoid(alpha * x)
    SkipLayerNormalization(x, s, g[, be[, bi]]) -> (LayerNormalization(x + s [+ bi], g, be, axis=-1, eps), ..., x + s [+ bi])
                                                                                       (opset >= 17)
    FusedMatMul(A, B, alpha, transA, transB) = alpha * (A^T? @ B^T?)   (transposes of the last two axes)

Preconditions, per converter:
    1. The default-domain opset has the standard op (Gelu 20, LayerNormalization 17).
    2. Only the outputs the standard form computes are read (SkipLayerNormalization's mean and
       inverse std outputs are not).
    3. FusedMatMul: transBatchA / transBatchB are 0, and the rank is known where a transpose is needed.
A node that fails a precondition stays, and the portable output's note names it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from graphopt import ops
from graphopt.ir import ir
from graphopt.passes._edits import replace_value
from graphopt.passes._weights import add_initializer
from graphopt.registry import register
from graphopt.rewrite import RULE_TAG, Pass, PassKind

GELU_OPSET, LAYER_NORM_OPSET = 20, 17
RULE = "StandardizeContribOp"


def _gelu(graph, node, opset) -> list[ir.Node] | None:
    if opset < GELU_OPSET:
        return None
    new, x = [], node.inputs[0]
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        new.append(ir.node("Add", [x, node.inputs[1]]))
        x = new[-1].outputs[0]
    tanh = node.op_type == "FastGelu"
    new.append(ir.node("Gelu", [x], attributes={"approximate": "tanh"} if tanh else {}))
    return new


def _quick_gelu(graph, node, opset) -> list[ir.Node]:
    alpha = node.attributes.get_float("alpha", 1.702)
    x = node.inputs[0]
    scale = add_initializer(graph, node.outputs[0], np.array(alpha, _np_dtype(x)), "alpha")
    scaled = ir.node("Mul", [x, scale])
    gate = ir.node("Sigmoid", [scaled.outputs[0]])
    return [scaled, gate, ir.node("Mul", [x, gate.outputs[0]])]


def _skip_layer_norm(graph, node, opset) -> tuple[list[ir.Node], dict] | None:
    if opset < LAYER_NORM_OPSET or any(out.uses() or out.is_graph_output() for out in node.outputs[1:3]):
        return None
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    x, skip, gamma, beta, bias = inputs[:5]
    new = [ir.node("Add", [x, skip])]
    if bias is not None:
        new.append(ir.node("Add", [new[-1].outputs[0], bias]))
    total = new[-1].outputs[0]
    norm_inputs = [total, gamma] + ([beta] if beta is not None else [])
    epsilon = node.attributes.get_float("epsilon", 1e-12)
    new.append(ir.node("LayerNormalization", norm_inputs, attributes={"axis": -1, "epsilon": epsilon}))
    # output 3 is the sum x + skip (+ bias), which ORT writes for the next skip norm
    return new, {0: new[-1].outputs[0], 3: total}


def _fused_matmul(graph, node, opset) -> list[ir.Node] | None:
    a, b = node.inputs[0], node.inputs[1]
    if node.attributes.get_int("transBatchA", 0) or node.attributes.get_int("transBatchB", 0):
        return None
    new = []
    operands = []
    for value, flag in ((a, "transA"), (b, "transB")):
        if node.attributes.get_int(flag, 0):
            if value.shape is None or len(value.shape) < 2:
                return None
            rank = len(value.shape)
            new.append(ir.node("Transpose", [value], attributes={"perm": [*range(rank - 2), rank - 1, rank - 2]}))
            value = new[-1].outputs[0]
        operands.append(value)
    new.append(ir.node("MatMul", operands))
    alpha = node.attributes.get_float("alpha", 1.0)
    if alpha != 1.0:
        scale = add_initializer(graph, node.outputs[0], np.array(alpha, _np_dtype(a)), "alpha")
        new.append(ir.node("Mul", [new[-1].outputs[0], scale]))
    return new


def _np_dtype(value: ir.Value):
    return value.dtype.numpy() if value.dtype is not None else np.float32


CONVERTERS: dict[str, Callable] = {
    "FastGelu": _gelu, "Gelu": _gelu, "BiasGelu": _gelu, "QuickGelu": _quick_gelu,
    "SkipLayerNormalization": _skip_layer_norm, "FusedMatMul": _fused_matmul,
}


@register
class StandardizeContribOps(Pass):
    """Write onnxruntime contrib ops that have an exact standard form as standard ONNX."""

    name = "standardize-contrib-ops"
    kind = PassKind.EXACT
    requires_shapes = True  # FusedMatMul's transposes need the rank

    def run(self, model: ir.Model) -> dict[str, int]:
        done = 0
        for graph in model.graphs():
            opset = graph.opset_imports.get("", model.opset_imports.get("", 0))
            for node in list(graph):
                convert = CONVERTERS.get(node.op_type) if node.domain == ops.ORT_CONTRIB_DOMAIN else None
                made = convert(graph, node, opset) if convert else None
                if not made:
                    continue
                new, outputs = made if isinstance(made, tuple) else (made, {0: made[-1].outputs[0]})
                for n in new:
                    n.metadata_props[RULE_TAG] = RULE
                graph.insert_before(node, new)
                for index, value in outputs.items():
                    if index < len(node.outputs):
                        replace_value(graph, node.outputs[index], value)
                graph.remove(node, safe=True)
                done += 1
        return {RULE: done}
