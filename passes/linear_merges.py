"""Linear-layer merges: parallel projections of one input (Q/K/V, gate/up) into one
MatMul, and chains of constant linear maps into one.

The parallel merge rewrites groups of siblings of any size, which a fixed-shape
pattern cannot express, so it is a structural pass (same docstring contract, and
an `explain`); the chain merges are ordinary rules.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt import ops
from graphopt.ir import MatchResult, ir, pattern
from graphopt.passes._weights import add_initializer, const_array, new_initializer, release_if_unused
from graphopt.registry import register
from graphopt.rewrite import RULE_TAG, Pass, PassKind, Rule, RulePass

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
        old_weights = [b.matmul.inputs[1] for b in branches]
        for branch in branches:
            graph.remove([n for n in (branch.add, branch.matmul) if n is not None], safe=True)
            branch.weight = branch.bias = None  # the views of the old weights, so they can be released
        for value in old_weights:
            release_if_unused(value)


def _position(graph: ir.Graph, node: ir.Node) -> int:
    for i, n in enumerate(graph):
        if n is node:
            return i
    raise ValueError(f"node {node.name} is not in the graph")


def _last_axis_vector(array: np.ndarray | None, n: int) -> np.ndarray | None:
    """`array` as a length-n vector when it is a scalar or varies only along the last axis."""
    if array is None or (array.ndim > 0 and (array.size != array.shape[-1] or array.shape[-1] not in (1, n))):
        return None
    return np.broadcast_to(array.reshape(-1), (n,)).astype(np.float64)


def _inner_bias(bias_add_value: ir.Value | None, matmul_value: ir.Value) -> ir.Value | None:
    """The constant operand of an Add(MatMul output, b)."""
    node = bias_add_value.producer() if bias_add_value is not None else None
    if node is None:
        return None
    return node.inputs[1] if node.inputs[0] is matmul_value else node.inputs[0]


class MergeMatMulChain(Rule):
    """Merge two constant linear maps applied in a row.

    Math (A [K, M], B [M, N], a [M]):
        (x A + a) B = x (A B) + a B
    Preconditions:
        1. A and B (and a) are constant, A and B 2-D.
        2. The merged map costs no more than the chain: K * N <= K * M + M * N (low-rank
           factorizations such as LoRA adapters are kept).
    """

    variants = ({"bias": False}, {"bias": True})

    def pattern(self, op, x, a_w, b_w):
        inner = op.MatMul(x, a_w, _outputs=["inner"])
        if self.bias:
            inner = op.Add(inner, pattern.Var("a_b"), _outputs=["biased"])
        return op.MatMul(inner, b_w)

    def check(self, context, a_w, b_w, inner, biased=None, **_):
        result = MatchResult()
        a, b = const_array(a_w), const_array(b_w)
        if a is None or b is None or a.ndim != 2 or b.ndim != 2:
            return result.fail("the weights are not constant matrices", a_w if a is None else b_w)
        if self.bias and _last_axis_vector(const_array(_inner_bias(biased, inner)), a.shape[1]) is None:
            return result.fail("the inner bias is not a constant vector over the last axis", biased)
        (k, m), n = a.shape, b.shape[1]
        if k * n > k * m + m * n:
            return result.fail(f"merging a rank-{m} factorization ({k}x{m}, {m}x{n}) would raise the cost", a_w)
        return result

    def rewrite(self, op, x, a_w, b_w, inner, biased=None, **_):
        a, b = const_array(a_w), const_array(b_w)
        product = op.MatMul(x, new_initializer(op, b_w, (a.astype(np.float64) @ b).astype(b.dtype), "chain"))
        if not self.bias:
            return product
        bias = _last_axis_vector(const_array(_inner_bias(biased, inner)), a.shape[1]) @ b.astype(np.float64)
        return op.Add(product, new_initializer(op, b_w, bias.astype(b.dtype), "chain_bias"))


class FoldScaleIntoMatMul(Rule):
    """Fold a constant per-output-column scale into the weights of the MatMul before it.

    Math (s a scalar or a vector over the last axis):
        (x W + b) * s = x (W diag(s)) + b * s
    Preconditions:
        1. W is a constant matrix; s (and b) are constants varying along the last axis at most.
    """

    commute = True
    variants = ({"bias": False}, {"bias": True})

    def pattern(self, op, x, w, s):
        y = op.MatMul(x, w, _outputs=["product"])
        if self.bias:
            y = op.Add(y, pattern.Var("b"), _outputs=["biased"])
        return op.Mul(y, s)

    def check(self, context, w, s, product, biased=None, **_):
        result = MatchResult()
        weight = const_array(w)
        if weight is None or weight.ndim != 2:
            return result.fail(f"'{w.name}' is not a constant matrix", w)
        n = weight.shape[1]
        if _last_axis_vector(const_array(s), n) is None:
            return result.fail(f"'{s.name}' is not a constant varying along the last axis only", s)
        if self.bias and _last_axis_vector(const_array(_inner_bias(biased, product)), n) is None:
            return result.fail("the bias is not a constant vector over the last axis", biased)
        return result

    def rewrite(self, op, x, w, s, product, biased=None, **_):
        weight = const_array(w)
        scale = _last_axis_vector(const_array(s), weight.shape[1])
        out = op.MatMul(x, new_initializer(op, w, (weight * scale[None, :]).astype(weight.dtype), "scaled"))
        if not self.bias:
            return out
        bias = _last_axis_vector(const_array(_inner_bias(biased, product)), weight.shape[1]) * scale
        return op.Add(out, new_initializer(op, w, bias.astype(weight.dtype), "scaled_bias"))


class MergeBiasAdds(Rule):
    """Merge two constant shifts after a MatMul.

    Math:  (x W + b1) + b2 = x W + (b1 + b2)
    Preconditions:
        1. b1 and b2 are constants varying along the last axis at most.
    """

    commute = True

    def pattern(self, op, x, w, b1, b2):
        return op.Add(op.Add(op.MatMul(x, w, _outputs=["product"]), b1), b2)

    def check(self, context, w, b1, b2, **_):
        result = MatchResult()
        weight = const_array(w)
        n = weight.shape[-1] if weight is not None and weight.ndim == 2 else None
        if n is None or _last_axis_vector(const_array(b1), n) is None or _last_axis_vector(const_array(b2), n) is None:
            return result.fail("the shifts are not constant vectors over the MatMul's output columns", b2)
        return result

    def rewrite(self, op, x, w, b1, b2, **_):
        n = const_array(w).shape[-1]
        dtype = const_array(b1).dtype
        total = _last_axis_vector(const_array(b1), n) + _last_axis_vector(const_array(b2), n)
        return op.Add(op.MatMul(x, w), new_initializer(op, b1, total.astype(dtype), "merged"))


@register
class MergeLinearChains(RulePass):
    """Merge chains of constant linear maps: MatMul->MatMul, MatMul->Mul(scale), bias->bias."""

    name = "merge-linear-chains"
    kind = PassKind.EXACT
    rules = (MergeMatMulChain, FoldScaleIntoMatMul, MergeBiasAdds)
