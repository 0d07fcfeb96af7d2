"""Linear-layer merges: parallel projections of one input (Q/K/V, gate/up) into one MatMul.

This rewrites groups of siblings of any size, which a fixed-shape pattern cannot
express, so it is a structural pass; the class still states one identity with
numbered preconditions, and `explain` says why a candidate was left alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt import ops
from graphopt.ir import ir
from graphopt.passes._weights import add_initializer, const_array
from graphopt.registry import register
from graphopt.rewrite import RULE_TAG, Pass, PassKind

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
