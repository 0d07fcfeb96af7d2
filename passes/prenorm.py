"""Pre-LN -> Pre-RMSNorm (Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm Transformers:
Equivalent and Efficient Pre-LN Transformers", 2023).

LayerNorm is invariant to the mean of its input: LN(x) = LN(x - mean(x)). So if
every write into the residual stream is re-centred (its mean over the hidden axis
subtracted, by editing the writer's weights), the stream is zero-mean at every
layer, and for zero-mean x: LN(x; g, b) = RMSNorm(x; g) + b, with the same eps.

The pass first proves, on the graph, that the model is Pre-LN: it finds the
residual stream as the chain of Adds ending at the final LayerNorm, checks that
nothing but LayerNorms and the next Add reads it (which a Post-LN model fails),
and that every write into it is a re-centrable linear map, embedding or constant.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt import functions, ops
from graphopt.ir import ir
from graphopt.passes._checks import opset_of
from graphopt.passes._edits import replace_value
from graphopt.passes._weights import add_initializer, const_array
from graphopt.registry import register
from graphopt.rewrite import RULE_TAG, Pass, PassKind

RMS_NORM_OPSET = 23
_THROUGH = ("Reshape", "Identity")  # ops a writer may pass through (Reshape only if the last dim is kept)


@dataclasses.dataclass
class _Stream:
    final_norm: ir.Node
    adds: list  # stream Adds, last first
    norms: list  # LayerNorms reading the stream (final included)
    writers: list  # (node, input index, hidden axis) of every constant the re-centring edits


def _is_layer_norm(node: ir.Node) -> bool:
    if node.op_type != "LayerNormalization" or node.domain not in ("", functions.DOMAIN):
        return False
    out = node.outputs[0]
    return node.domain == functions.DOMAIN or node.attributes.get_int("axis", -1) in (-1, len(out.shape or ()) - 1)


def _norm_readers(value: ir.Value) -> list[ir.Node]:
    return [n for n, i in value.uses() if i == 0 and _is_layer_norm(n)]


def _writer_constants(node: ir.Node, index: int, hidden: int, depth: int = 8, axis: int = -1) -> list | str:
    """(node, input index, hidden axis) of every constant that decides the hidden-axis mean of
    input `index` of `node` (a write into the residual stream), or the reason it cannot be
    re-centred. `axis`: where the stream's hidden axis is in that input (negative, from the end)."""
    value = node.inputs[index]
    if const_array(value) is not None and value.producer() is None:
        return [(node, index, axis)]
    producer = value.producer()
    if producer is None:
        return f"'{value.name}' enters the residual stream from outside the graph"
    return _producer_constants(producer, hidden, depth, axis)


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _producer_constants(node: ir.Node, hidden: int, depth: int = 8, axis: int = -1) -> list | str:
    where = f"{node.op_type} '{node.name}'"
    if _is_layer_norm(node):
        return (f"the output of {where} is added into the residual stream: a Post-LN block "
                "(LayerNorm after the residual Add), which has no Pre-RMSNorm equivalent")
    if depth == 0 or node.domain != "":
        return f"{where} writes into the residual stream and is not a linear map graphopt can re-centre"
    out_rank = _rank(node.outputs[0])
    if node.op_type in _THROUGH:
        if node.op_type == "Reshape":
            moved = _reshaped_axis(node, axis, hidden)
            return moved if isinstance(moved, str) else _writer_constants(node, 0, hidden, depth - 1, moved)
        return _writer_constants(node, 0, hidden, depth - 1, axis)
    if node.op_type == "Expand":  # broadcasting aligns axes from the end
        return _writer_constants(node, 0, hidden, depth - 1, axis)
    if node.op_type == "Transpose" and out_rank is not None:
        perm = node.attributes.get_ints("perm", list(reversed(range(out_rank))))
        return _writer_constants(node, 0, hidden, depth - 1, perm[axis + out_rank] - out_rank)
    if node.op_type == "Concat" and out_rank is not None:
        if node.attributes.get_int("axis", 0) % out_rank == axis % out_rank:
            return f"{where} concatenates along the hidden axis"
        parts = [_writer_constants(node, i, hidden, depth - 1, axis) for i in range(len(node.inputs))]
        return next((p for p in parts if isinstance(p, str)), None) or [w for p in parts for w in p]
    if node.op_type == "Add":
        parts = [_writer_constants(node, i, hidden, depth - 1, axis) for i in (0, 1)]
        return next((p for p in parts if isinstance(p, str)), None) or parts[0] + parts[1]
    if node.op_type == "Conv" and out_rank is not None and axis % out_rank == 1 and const_array(node.inputs[1]) is not None:
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        if has_bias and const_array(node.inputs[2]) is None:
            return f"{where} has a non-constant bias"
        return [(node, 1, 0)] + ([(node, 2, -1)] if has_bias else [])  # output channels: W's axis 0
    if axis != -1:
        return f"{where} writes into the residual stream with the hidden axis at {axis}, not last"
    if node.op_type == "Gather" and node.attributes.get_int("axis", 0) == 0 and const_array(node.inputs[0]) is not None:
        return [(node, 0, -1)]
    if node.op_type == "MatMul" and const_array(node.inputs[1]) is not None and const_array(node.inputs[1]).ndim == 2:
        return [(node, 1, -1)]
    if node.op_type == "Gemm" and const_array(node.inputs[1]) is not None:
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        if has_bias and const_array(node.inputs[2]) is None:
            return f"{where} has a non-constant bias"
        return [(node, 1, 0 if node.attributes.get_int("transB", 0) else -1)] + ([(node, 2, -1)] if has_bias else [])
    return f"{where} writes into the residual stream and is not a linear map graphopt can re-centre"


def _reshaped_axis(node: ir.Node, axis: int, hidden: int) -> int | str:
    """The hidden axis in the Reshape's input, when the Reshape keeps it and every axis before it."""
    x, y = node.inputs[0].shape, node.outputs[0].shape
    where = f"Reshape '{node.name}'"
    if x is None or y is None:
        return f"{where} may change the hidden axis"
    if axis == -1:
        return -1 if x[-1] == hidden else f"{where} may change the hidden axis"
    at = axis + len(y)
    if at < 0 or at >= len(x) or y[at] != hidden or any(a != b for a, b in zip(x[:at + 1], y[:at + 1])):
        return f"{where} may change the hidden axis"
    return at - len(x)


def _find_stream(graph: ir.Graph) -> _Stream | str:
    norms = [n for n in graph if _is_layer_norm(n)]
    if not norms:
        return "the model has no LayerNormalization over its last axis"
    finals = [n for n in norms if not any(_norm_readers(v) for v in _downstream_adds(n.inputs[0]))]
    final = finals[-1]
    stream = final.inputs[0]
    hidden = stream.shape[-1] if stream.shape is not None and len(stream.shape) else None
    if not isinstance(hidden, int):
        return f"the hidden size at '{stream.name}' is not static"
    adds, writers, cur = [], [], stream
    while True:
        node = cur.producer()
        if node is None or node.op_type != "Add" or node.domain != "":
            break
        a, b = node.inputs
        on_stream = [v for v in (a, b) if _norm_readers(v)]
        if len(on_stream) != 1:
            break  # the origin: a sum of embeddings (both operands are writers)
        found = _writer_constants(node, 1 if on_stream[0] is a else 0, hidden)
        if isinstance(found, str):
            return found
        adds.append(node)
        writers += found
        cur = on_stream[0]
    origin = _producer_constants(cur.producer(), hidden) if cur.producer() is not None else \
        f"'{cur.name}' enters the residual stream from outside the graph"
    if isinstance(origin, str):
        return f"the stream's origin: {origin}"
    writers += origin
    if not adds:
        return f"no residual Adds lead to the final LayerNorm '{final.name}': not a Pre-LN transformer"
    forward = list(reversed(adds))
    stream_values = [cur] + [a.outputs[0] for a in forward]
    stream_norms = []
    for i, value in enumerate(stream_values):
        allowed = set(_norm_readers(value)) | ({forward[i]} if i < len(forward) else set())
        for reader, _ in value.uses():
            if reader not in allowed and (reader.domain, reader.op_type) not in ops.SHAPE_ONLY_READERS:
                return (f"residual-stream value '{value.name}' is read by {reader.op_type} '{reader.name}', not a LayerNorm: "
                        "a Post-LN block or a branch reading the raw stream")
        if value.is_graph_output():
            return f"residual-stream value '{value.name}' is a graph output"
        stream_norms += _norm_readers(value)
    return _Stream(final, adds, stream_norms, writers)


def _downstream_adds(value: ir.Value) -> list[ir.Value]:
    return [n.outputs[0] for n, _ in value.uses() if n.op_type == "Add" and n.domain == ""]


def _recentre(graph: ir.Graph, writer: tuple[ir.Node, int, int]) -> None:
    """Replace the constant input by its copy re-centred over its hidden axis (shared weights
    stay intact): columns of W (rows of a transposed Gemm B, output channels of a Conv), rows
    of a table, a bias, a broadcast constant (one that is constant along the hidden axis: 0)."""
    node, index, axis = writer
    array = const_array(node.inputs[index]).astype(np.float64)
    if array.ndim < (-axis if axis < 0 else axis + 1) or array.shape[axis] == 1:
        centred = np.zeros_like(array)  # the same value at every hidden position: LN removes it
    else:
        centred = array - array.mean(axis=axis, keepdims=True)
    node.replace_input_with(index, add_initializer(graph, node.inputs[index], centred.astype(const_array(node.inputs[index]).dtype), "centred"))
    node.metadata_props[RULE_TAG] = PreLNToPreRMSNorm.RULE


@register
class PreLNToPreRMSNorm(Pass):
    """Convert a Pre-LN transformer to Pre-RMSNorm: re-centre every write into the residual stream, then LN -> RMSNorm.

    Math (m(x) the mean over the hidden axis):
        LN(x) = LN(x - m(x));  for m(x) = 0: LN(x; g, b) = RMSNorm(x; g) + b   (same eps)
        writers re-centred: E'[v] = E[v] - m(E[v]);  W' = W - m over output columns;  b' = b - m(b)
        so every stream value is x - m(x), and every LN on the stream sees the same normalized input.
    Preconditions:
        1. The model has LayerNorms over the last axis, and a final one ends the residual stream.
        2. The stream is a chain of Adds; each stream value is read only by LayerNorms and the
           next Add (a Post-LN model fails here, with the reader named).
        3. Every write into the stream (each Add's other operand, and the origin) is a constant-weight
           MatMul/Gemm (with bias), an embedding Gather of a constant table, a constant, or a sum of
           these, through Reshapes that keep the hidden axis; or, ViT-style, a Concat (not along
           the hidden axis) of such writers, a broadcast (Expand) constant such as a class token,
           and a patch Conv whose output channels become the hidden axis through Reshapes and a
           Transpose.
    """

    name = "pre-rmsnorm"
    kind = PassKind.EXACT
    requires_shapes = True  # hidden size, Reshapes that keep it
    RULE = "PreLNToPreRMSNorm"

    def run(self, model: ir.Model) -> dict[str, int]:
        stream = _find_stream(model.graph)
        if isinstance(stream, str):
            return {self.RULE: 0}
        for writer in dict.fromkeys(stream.writers):  # a constant reached twice is centred once
            _recentre(model.graph, writer)
        for norm in stream.norms:
            _to_rms(model.graph, norm)
        return {self.RULE: len(stream.norms)}

    def explain(self, model: ir.Model) -> list[str]:
        stream = _find_stream(model.graph)
        return [f"{self.RULE}: {stream}"] if isinstance(stream, str) else []


def _to_rms(graph: ir.Graph, norm: ir.Node) -> None:
    """LN(x; g, b, eps) on zero-mean x -> RMSNorm(x; g, eps) (+ b)."""
    x, scale = norm.inputs[0], norm.inputs[1]
    bias = norm.inputs[2] if len(norm.inputs) > 2 else None
    if norm.domain == functions.DOMAIN:
        eps = float(const_array(norm.inputs[3]).reshape(()))
    else:
        eps = norm.attributes.get_float("epsilon", 1e-5)
    if opset_of(x) >= RMS_NORM_OPSET:
        rms = ir.node("RMSNormalization", [x, scale], attributes={"axis": -1, "epsilon": eps})
    else:
        epsilon = add_initializer(graph, scale, np.array(eps, np.float32), "rms_eps")
        rms = ir.node("RMSNormalization", [x, scale, epsilon], domain=functions.DOMAIN)
    nodes = [rms]
    b = const_array(bias) if bias is not None else None
    if bias is not None and (b is None or np.any(b != 0)):  # a zero bias needs no Add
        nodes.append(ir.node("Add", [rms.outputs[0], bias]))
    for n in nodes:
        n.metadata_props[RULE_TAG] = PreLNToPreRMSNorm.RULE
    graph.insert_before(norm, nodes)
    replace_value(graph, norm.outputs[0], nodes[-1].outputs[0])
    graph.remove(norm, safe=True)
