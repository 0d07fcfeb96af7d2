"""Attention-scale fold: move a constant scale on attention scores (or on Q and K) into
the projection weights that produce them.

A structural pass: the scale may sit behind head reshapes, transposes and RoPE, so
it traces the cone of ops between the scale and the projections, each homogeneous
of degree 1 in the traced input, and checks that nothing outside reads into it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt import ops
from graphopt.ir import ir
from graphopt.passes._weights import add_initializer, const_array
from graphopt.registry import register
from graphopt.rewrite import RULE_TAG, Pass, PassKind


# Ops that are homogeneous of degree 1 in input 0: op(c * x, ...) = c * op(x, ...).
_SCALE_THROUGH_FIRST = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand",
                                  "Slice", "Neg", "Split", "Gather"})
# Homogeneous when every input is scaled: Add(c x, c y) = c Add(x, y).
_SCALE_THROUGH_ALL = frozenset({"Add", "Sub", "Concat"})


@dataclasses.dataclass(frozen=True)
class _Projection:
    """A linear map with constant weights: MatMul(x, W) [+ b] or Gemm; `columns` selects the
    output block a Split hands on (None: all of it)."""

    node: ir.Node
    bias_add: ir.Node | None = None
    columns: tuple[int, int] | None = None

    def scale(self, graph: ir.Graph, factor: float) -> None:
        node = self.node
        lo, hi = self.columns if self.columns else (None, None)
        if node.op_type == "Gemm":
            trans_b = node.attributes.get_int("transB", 0)
            if self.columns is None:
                node.attributes["alpha"] = ir.AttrFloat32("alpha", node.attributes.get_float("alpha", 1.0) * factor)
                node.attributes["beta"] = ir.AttrFloat32("beta", node.attributes.get_float("beta", 1.0) * factor)
            else:
                _scale_input(graph, node, 1, factor, (slice(lo, hi), slice(None)) if trans_b else (slice(None), slice(lo, hi)))
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    _scale_input(graph, node, 2, factor, (Ellipsis, slice(lo, hi)))
        else:
            _scale_input(graph, node, 1, factor, (Ellipsis, slice(lo, hi)))
            if self.bias_add is not None:
                i = 0 if const_array(self.bias_add.inputs[0]) is not None else 1
                _scale_input(graph, self.bias_add, i, factor, (Ellipsis, slice(lo, hi)))
        node.metadata_props[RULE_TAG] = FoldAttentionScale.RULE

    def nodes(self) -> set:
        return {self.node} | ({self.bias_add} if self.bias_add is not None else set())


def _scale_input(graph: ir.Graph, node: ir.Node, index: int, factor: float, where) -> None:
    """Replace constant input `index` of `node` by a copy with `where` scaled (shared weights stay intact)."""
    original = node.inputs[index]
    array = const_array(original).copy()
    array[where] = array[where] * factor
    node.replace_input_with(index, add_initializer(graph, original, array.astype(const_array(original).dtype), "scaled"))


def _projection(node: ir.Node) -> _Projection | None:
    """`node` ends a linear map with constant weights: MatMul(x, W), Add(MatMul(x, W), b), or Gemm."""
    if node.domain != "":
        return None
    if node.op_type in ("MatMul", "Gemm") and const_array(node.inputs[1]) is not None and const_array(node.inputs[0]) is None:
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and const_array(node.inputs[2]) is None:
            return None
        return _Projection(node)
    if node.op_type == "Add":
        for i in (0, 1):
            producer = node.inputs[i].producer() if node.inputs[i] is not None else None
            if producer is not None and const_array(node.inputs[1 - i]) is not None:
                inner = _projection(producer)
                if inner is not None and inner.node.op_type == "MatMul" and inner.bias_add is None:
                    return _Projection(producer, node)
    return None


def _column_block(split: ir.Node, index: int) -> _Projection | None:
    """Output `index` of a last-axis Split of a projection (through Reshapes that keep the last
    dim): the block of the projection's output columns it carries."""
    sizes = const_array(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
    if sizes is None and "split" in split.attributes:
        sizes = np.array(split.attributes.get_ints("split"))
    data = split.inputs[0]
    if data.shape is None or split.attributes.get_int("axis", 0) not in (-1, len(data.shape) - 1):
        return None
    if sizes is None and "num_outputs" in split.attributes and isinstance(data.shape[-1], int):
        parts = split.attributes.get_int("num_outputs")  # opset 18: equal blocks (the last may be smaller)
        block = -(-data.shape[-1] // parts)
        sizes = np.array([min(block, data.shape[-1] - i * block) for i in range(parts)])
    if sizes is None:
        return None
    value = data
    while (node := value.producer()) is not None and node.op_type == "Reshape" and node.domain == "":
        source = node.inputs[0]
        if source.shape is None or value.shape is None or source.shape[-1] != value.shape[-1] or not isinstance(value.shape[-1], int):
            return None
        value = source
    found = _projection(node) if node is not None else None
    if found is None:
        return None
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return dataclasses.replace(found, columns=(int(offsets[index]), int(offsets[index + 1])))


def _reaches_projection(value: ir.Value, depth: int = 24) -> bool:
    node = value.producer()
    if node is None or depth == 0:
        return False
    return _projection(node) is not None or any(v is not None and _reaches_projection(v, depth - 1) for v in node.inputs)


@dataclasses.dataclass
class _Cone:
    """The nodes between a scale and the projections it is folded into."""

    nodes: set
    projections: list
    chain: set  # nodes between a projection and the Split that selects its column block


def _trace_cone(start: ir.Value) -> _Cone | str:
    """Walk back from `start` through ops homogeneous in the traced input to constant-weight projections."""
    cone, projections, chain, stack, seen = set(), [], set(), [start], set()
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        node = value.producer()
        if node is None:
            return f"'{value.name}' is not computed from a projection with constant weights"
        if node.op_type == "Split" and (block := _column_block(node, value.index())) is not None:
            projections.append(block)
            chain |= _chain_between(block.node, node)
            continue
        if (found := _projection(node)) is not None:
            projections.append(found)
            continue
        cone.add(node)
        if node.op_type in _SCALE_THROUGH_FIRST and node.domain == "":
            stack.append(node.inputs[0])
        elif node.op_type in _SCALE_THROUGH_ALL and node.domain == "":
            stack.extend(v for v in node.inputs if v is not None)
        elif (node.op_type, node.domain) in (("Mul", ""), ("MatMul", "")):
            traced = [v for v in node.inputs if v is not None and _reaches_projection(v)]
            if not traced:
                return f"neither input of '{node.name}' comes from a projection"
            stack.append(traced[0])  # bilinear: scaling one factor scales the product
        else:
            return f"{node.op_type} '{node.name}' between the projection and the scale is not linear in it"
    return _Cone(cone, projections, chain)


def _chain_between(projection: ir.Node, split: ir.Node) -> set:
    """The Reshapes (and the bias Add) from a projection's output to the Split reading it."""
    nodes, value = set(), split.inputs[0]
    while (node := value.producer()) is not None and node is not projection:
        nodes.add(node)
        value = node.inputs[0]
    return nodes


def _closed(cone: _Cone, scale: ir.Node) -> str | None:
    """Every value inside the cone must be read only inside it (else the fold changes other
    readers); reading only its shape is fine, and a Split's other column blocks are not scaled."""
    whole = [p for p in cone.projections if p.columns is None]
    inside = cone.nodes | cone.chain | {scale} | set().union(*(p.nodes() for p in cone.projections))
    checked = cone.nodes | set().union(*(p.nodes() for p in whole))
    for node in checked:
        for out in node.outputs:
            if out.is_graph_output():
                return f"'{out.name}' is a graph output"
            for reader, _ in out.uses():
                if reader not in inside and (reader.domain, reader.op_type) not in ops.SHAPE_ONLY_READERS:  # Shape(c x) = Shape(x)
                    return f"'{out.name}' is also read by '{reader.name}' ({reader.op_type}) outside the attention path"
    return None


@register
class FoldAttentionScale(Pass):
    """Fold a constant attention scale into the projection weights it multiplies (Q, or Q and K).

    Math (c a scalar; every op on the path from the projection to the scale is homogeneous
    of degree 1 in it: layout ops, Neg, Concat/Add/Sub of scaled terms, Mul by a tensor that
    does not depend on it, such as RoPE's cos/sin):
        ((x W + b) ... ) * c = (x (c W) + c b) ...
        (Q K^T) * c = (c Q) K^T          and  Q * sqrt(c), K * sqrt(c) each into their projection
    Preconditions:
        1. The scale is Mul or Div by a scalar constant, on attention scores (a MatMul of two
           activations) or on an operand of one.
        2. Every op between the scale and the projection(s) is homogeneous in the traced input.
        3. The projections have constant weights (and bias), and every value on the path is
           read only on the path.
    """

    name = "fold-attention-scale"
    kind = PassKind.EXACT
    requires_shapes = True  # column blocks of a split projection need the hidden size
    RULE = "FoldAttentionScale"

    def run(self, model: ir.Model) -> dict[str, int]:
        folded = 0
        progress = True
        while progress:
            progress = False
            for scale, start, factor in self._scales(model.graph):
                cone = _trace_cone(start)
                if isinstance(cone, str) or _closed(cone, scale) is not None:
                    continue
                self._fold(model.graph, scale, start, cone, factor)
                folded += 1
                progress = True
                break  # the graph changed: look again
        return {self.RULE: folded}

    def explain(self, model: ir.Model) -> list[str]:
        lines = []
        for scale, start, _ in self._scales(model.graph):
            cone = _trace_cone(start)
            reason = cone if isinstance(cone, str) else _closed(cone, scale)
            if reason:
                lines.append(f"{self.RULE}: {scale.op_type} '{scale.name}': {reason}")
        return lines

    @staticmethod
    def _scales(graph: ir.Graph):
        """(scale node, the value to trace, multiplicative factor) for each candidate."""
        for node in list(graph):
            if node.domain != "" or node.op_type not in ("Mul", "Div"):
                continue
            for i in ((0, 1) if node.op_type == "Mul" else (0,)):
                data, constant = node.inputs[i], node.inputs[1 - i]
                c = const_array(constant)
                if data is None or c is None or c.size != 1 or float(c.reshape(())) == 0:
                    continue
                factor = float(c.reshape(())) if node.op_type == "Mul" else 1.0 / float(c.reshape(()))
                producer = data.producer()
                if _is_scores(producer):
                    yield node, data, factor
                elif _feeds_scores(node.outputs[0]):
                    yield node, data, factor
                break

    @staticmethod
    def _fold(graph: ir.Graph, scale: ir.Node, start: ir.Value, cone: _Cone, factor: float) -> None:
        for projection in cone.projections:
            projection.scale(graph, factor)
        out = scale.outputs[0]
        out.replace_all_uses_with(start)
        graph.remove(scale, safe=True)


def _is_scores(node: ir.Node | None) -> bool:
    """A MatMul of two activations (attention scores, or scores times values)."""
    return node is not None and (node.domain, node.op_type) == ops.MATMUL and all(
        v is not None and const_array(v) is None for v in node.inputs)


def _feeds_scores(value: ir.Value, depth: int = 3) -> bool:
    """`value` reaches a scores MatMul through at most `depth` layout ops."""
    for reader, _ in value.uses():
        if _is_scores(reader):
            return True
        if depth and reader.op_type in ("Transpose", "Reshape") and _feeds_scores(reader.outputs[0], depth - 1):
            return True
    return False
