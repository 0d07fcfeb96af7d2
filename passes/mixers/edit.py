"""The graph edit every mixer kind shares: build the key mask from the attention bias, put the
mixer's nodes in place of the canonical op, tag them, add the function definitions."""

from __future__ import annotations

import numpy as np

from graphopt import functions
from graphopt.ir import common_passes, ir
from graphopt.passes._edits import replace_value
from graphopt.passes._weights import add_initializer
from graphopt.passes.attention.masks import HIDDEN
from graphopt.rewrite import RULE_TAG

RULE = "SwapMixer"


class Builder:
    """Collects the nodes a swap adds before the attention op it replaces."""

    def __init__(self, model: ir.Model, node: ir.Node) -> None:
        self.model, self.graph, self.node = model, model.graph, node
        self.nodes: list[ir.Node] = []

    def add(self, op: str, inputs, *, domain: str = "", name: str | None = None, num_outputs: int = 1, **attrs):
        n = ir.node(op, inputs, attributes=attrs, domain=domain, name=name, num_outputs=num_outputs)
        self.nodes.append(n)
        return n.outputs[0] if num_outputs == 1 else n.outputs

    def call(self, function: str, inputs, *, suffix: str, num_outputs: int = 1, **attrs):
        """A call of graphopt function `function`, named after the attention op."""
        return self.add(function, inputs, domain=functions.DOMAIN, name=f"{self.node.name}_{suffix}",
                        num_outputs=num_outputs, **attrs)

    def constant(self, array: np.ndarray, name: str) -> ir.Value:
        return add_initializer(self.graph, None, array, name)

    def install(self, output: ir.Value | None) -> None:
        """Readers of the attention output read `output` (None: already rewired); the new nodes
        go in before the attention op, which is then removed with what only it read."""
        if output is not None:
            replace_value(self.graph, self.node.outputs[0], output)
        for n in self.nodes:
            n.metadata_props[RULE_TAG] = RULE
        if self.nodes:
            self.graph.insert_before(self.node, self.nodes)
        common_passes.RemoveUnusedNodesPass()(self.model)
        functions.ensure(self.model)


def scale_attr(node: ir.Node) -> dict[str, ir.Attr]:
    return {"scale": ir.AttrFloat32("scale", node.attributes.get_float("scale", 1.0))}


def bias_of(node: ir.Node) -> ir.Value | None:
    return node.inputs[3] if len(node.inputs) > 3 else None


def same_length(q: ir.Value, kt: ir.Value) -> bool:
    """Queries and keys are statically the same tokens count (S == T: no past, no cross attention)."""
    if q.shape is None or kt.shape is None or len(q.shape) < 2 or len(kt.shape) < 1:
        return False
    s, t = q.shape[-2], kt.shape[-1]
    if isinstance(s, int) or isinstance(t, int):
        return s == t
    return s.value is not None and s.value == t.value


def bias_or_zero(b: Builder) -> ir.Value:
    bias = bias_of(b.node)
    return bias if bias is not None else b.constant(np.zeros((1, 1, 1, 1), np.float32), "no_bias")


def keymask(b: Builder, *, pushdown: bool = True) -> ir.Value:
    """[B|1, 1, T, 1]: 1 where the last query may see the key (padding masks hide the same keys
    from every query; a causal mask hides none from the last one), else 0. With `pushdown`,
    the last row is taken before the elementwise ops that build the bias (so a causal model
    no longer materializes its [S, T] mask: linear time and memory)."""
    bias = bias_of(b.node)
    if bias is None:
        return b.constant(np.ones((1, 1, 1, 1), np.float32), "keymask_ones")
    rank = len(bias.shape) if bias.shape is not None else 4
    if rank < 4:  # a [S, T] (or [H, S, T]) bias broadcast over batch and heads: give it those axes
        bias = b.add("Unsqueeze", [bias, b.constant(np.arange(4 - rank, dtype=np.int64), "bias_axes")])
        pushdown = False  # its producers are not of the rank the last-row push-down walks
    row = _last_row(b, bias, 12) if pushdown else _slice_last_row(b, bias)
    threshold = b.constant(np.array(HIDDEN, np.float32), "mask_hidden")
    visible = b.add("Cast", [b.add("Greater", [row, threshold])], to=ir.DataType.FLOAT)
    if b.graph.opset_imports.get("", 18) >= 18:
        combined = b.add("ReduceMin", [visible, b.constant(np.array([1], np.int64), "mask_heads")], keepdims=1)
    else:  # opset 13-17: axes is an attribute
        combined = b.add("ReduceMin", [visible], keepdims=1, axes=[1])
    return b.add("Transpose", [combined], perm=[0, 1, 3, 2])


# Elementwise ops with broadcasting: the last row of op(a, b, ..) is op(last row of each input).
_ROWWISE = frozenset({"Where", "And", "Or", "Xor", "Not", "Add", "Sub", "Mul", "Div", "Equal", "Less", "LessOrEqual",
                      "Greater", "GreaterOrEqual", "Cast", "Neg", "Abs", "Max", "Min"})


def _last_row(b: Builder, value: ir.Value, depth: int) -> ir.Value:
    """value[..., -1:, :] (rank >= 2), computed as early as the elementwise producers allow."""
    shape = value.shape
    if shape is None or len(shape) < 2:
        return _slice_last_row(b, value)
    if shape[-2] == 1:
        return value  # broadcast along the query axis already
    node = value.producer()
    if depth == 0 or node is None or node.domain != "" or node.op_type not in _ROWWISE or len(node.outputs) != 1:
        return _slice_last_row(b, value)
    inputs = []
    for x in node.inputs:
        if x is None or x.shape is None:
            return _slice_last_row(b, value)
        # an input of lower rank broadcasts along the query axis (axis -2 of the output)
        inputs.append(x if len(x.shape) < 2 else _last_row(b, x, depth - 1))
    return b.add(node.op_type, inputs, **{k: a.value for k, a in node.attributes.items()})


def _slice_last_row(b: Builder, value: ir.Value) -> ir.Value:
    last = b.constant(np.array([-1], np.int64), "mask_last")
    end = b.constant(np.array([np.iinfo(np.int64).max], np.int64), "mask_end")
    axis = b.constant(np.array([-2], np.int64), "mask_axis")
    return b.add("Slice", [value, last, end, axis])
