"""Linear-layer merges: parallel projections of one input (Q/K/V, gate/up) into one
MatMul, and chains of linear maps into one.

These rewrite groups of siblings or chains of any length, which a fixed-shape
pattern cannot express, so they are structural passes; each class still states
one identity with numbered preconditions, and `explain` says why a candidate
was left alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt import ops
from graphopt.ir import ir
from graphopt.passes._weights import add_initializer, const_array
from graphopt.registry import register
from graphopt.rewrite import Pass, PassKind

RULE_TAG = "graphopt.rule"  # metadata key naming the rule that made a node (onnxscript tags its own)
SPLIT_SIZES_AS_INPUT = 13  # Split takes `split` as an input from opset 13


@dataclasses.dataclass
class _Branch:
    matmul: ir.Node
    weight: np.ndarray
    add: ir.Node | None
    bias: np.ndarray | None

    @property
    def output(self) -> ir.Value:
        return (self.add or self.matmul).outputs[0]


def _branch(node: ir.Node, x: ir.Value) -> _Branch | str:
    """A MatMul(x, W) (+ Add(b)) branch, or the reason it cannot join a merge."""
    if (node.domain, node.op_type) != ops.MATMUL or node.inputs[0] is not x:
        return "not a MatMul reading the shared input first"
    weight = const_array(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return f"'{node.inputs[1].name}' is not a constant matrix"
    out = node.outputs[0]
    if out.is_graph_output():
        return f"'{out.name}' is a graph output"
    uses = list(out.uses())
    if len(uses) == 1 and (uses[0][0].domain, uses[0][0].op_type) == ops.ADD:
        add = uses[0][0]
        other = add.inputs[1 - uses[0][1]]
        bias = const_array(other)
        if bias is not None and bias.shape == (weight.shape[1],) and not add.outputs[0].is_graph_output():
            return _Branch(node, weight, add, bias)
    return _Branch(node, weight, None, None)


@register
class MergeParallelLinears(Pass):
    """Merge MatMuls that project one input with constant weights (Q/K/V, gate/up) into one MatMul and a Split.

    Math (W_i of shape [K, N_i], b_i of shape [N_i] or absent = 0):
        [x W_1 + b_1 | ... | x W_n + b_n] = x [W_1 | ... | W_n] + [b_1 | ... | b_n]
        then Split along the last axis into sizes N_1 ... N_n (grouped-query widths included).
    Preconditions:
        1. At least two MatMul(x, W) read the same x as their first input.
        2. Each W is a constant 2-D matrix; all share K and dtype.
        3. No branch output (MatMul, or its bias Add) is a graph output.
        4. A bias is a constant vector of length N_i added by the MatMul's only reader.
    """

    name = "merge-parallel-linears"
    kind = PassKind.EXACT
    RULE = "MergeParallelLinears"

    def run(self, model: ir.Model) -> dict[str, int]:
        merged = 0
        for x, branches, _ in self._candidates(model.graph):
            if len(branches) >= 2:
                self._merge(model.graph, x, branches)
                merged += 1
        return {self.RULE: merged}

    def explain(self, model: ir.Model) -> list[str]:
        lines = []
        for x, branches, rejected in self._candidates(model.graph):
            for node, reason in rejected:
                lines.append(f"{self.RULE}: MatMul '{node.name}' reading '{x.name}' left out: {reason}")
            if len(branches) == 1 and rejected:
                lines.append(f"{self.RULE}: '{x.name}' has only one mergeable projection")
        return lines

    @staticmethod
    def _candidates(graph: ir.Graph):
        seen: set[ir.Value] = set()
        for node in list(graph):
            if (node.domain, node.op_type) != ops.MATMUL or node.inputs[0] is None or node.inputs[0] in seen:
                continue
            x = node.inputs[0]
            seen.add(x)
            readers = [n for n, i in x.uses() if (n.domain, n.op_type) == ops.MATMUL and i == 0]
            if len(readers) < 2:
                continue
            branches, rejected = [], []
            for reader in readers:
                b = _branch(reader, x)
                (rejected.append((reader, b)) if isinstance(b, str) else branches.append(b))
            if branches:
                k, dtype = branches[0].weight.shape[0], branches[0].weight.dtype
                keep = [b for b in branches if b.weight.shape[0] == k and b.weight.dtype == dtype]
                rejected += [(b.matmul, "its weight's K or dtype differs") for b in branches if b not in keep]
                branches = keep
            yield x, branches, rejected

    @staticmethod
    def _merge(graph: ir.Graph, x: ir.Value, branches: list[_Branch]) -> None:
        sizes = [b.weight.shape[1] for b in branches]
        dtype = branches[0].weight.dtype
        first = min((b.matmul for b in branches), key=lambda n: _position(graph, n))
        weight = add_initializer(graph, branches[0].matmul.inputs[1], np.concatenate([b.weight for b in branches], axis=1), "merged")
        nodes = [ir.node("MatMul", [x, weight])]
        y = nodes[-1].outputs[0]
        if any(b.bias is not None for b in branches):
            bias = np.concatenate([b.bias if b.bias is not None else np.zeros(n, dtype) for b, n in zip(branches, sizes)])
            nodes.append(ir.node("Add", [y, add_initializer(graph, branches[0].matmul.inputs[1], bias.astype(dtype), "merged_bias")]))
            y = nodes[-1].outputs[0]
        opset = graph.opset_imports.get("", 13)
        if opset >= SPLIT_SIZES_AS_INPUT:
            split = add_initializer(graph, branches[0].matmul.inputs[1], np.array(sizes, np.int64), "merged_split")
            nodes.append(ir.node("Split", [y, split], attributes={"axis": -1}, num_outputs=len(branches)))
        else:
            nodes.append(ir.node("Split", [y], attributes={"axis": -1, "split": sizes}, num_outputs=len(branches)))
        for node in nodes:
            node.metadata_props[RULE_TAG] = MergeParallelLinears.RULE
        graph.insert_before(first, nodes)
        for branch, part in zip(branches, nodes[-1].outputs):
            old = branch.output
            part.name, part.type, part.shape = old.name, old.type, old.shape
            old.name = None
            old.replace_all_uses_with(part)
        for branch in branches:
            graph.remove([n for n in (branch.add, branch.matmul) if n is not None], safe=True)


def _position(graph: ir.Graph, node: ir.Node) -> int:
    for i, n in enumerate(graph):
        if n is node:
            return i
    raise ValueError(f"node {node.name} is not in the graph")


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
