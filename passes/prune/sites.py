"""Where structured pruning can remove work: the feed-forward blocks of a transformer
(attention heads are in `heads`).

Every site has the same face to the ranking and the refit: `units` (neurons, heads) of
`group` columns each in `rows`, the value its output projection `down` (MatMul with W2 = `w2`)
reads; `shrink(graph, keep)` removes the other units upstream, and `unit_flops` is what one
costs per token.

An FFN site is  y = act(x W1 + b1) W2 (+ b2)  with W1 [d, k], W2 [k, n] constant and `act`
elementwise with one input (Gelu, GeluTanh, Relu, SiLU, Tanh, Sigmoid; graphopt's functions or
the standard ops): neuron j of the k intermediate ones is column j of W1, b1[j] and row j of
W2, so removing it makes both matrices smaller and changes nothing else in the graph.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt import functions
from graphopt.ir import ir
from graphopt.passes._weights import add_initializer, const_array

ACTIVATIONS = frozenset({("", "Gelu"), ("", "Relu"), ("", "Tanh"), ("", "Sigmoid"), ("", "Erf"),
                         (functions.DOMAIN, "Gelu"), (functions.DOMAIN, "GeluTanh"), (functions.DOMAIN, "SiLU")})


@dataclasses.dataclass
class FfnSite:
    up: ir.Node  # MatMul(x, W1)
    up_bias: ir.Node | None  # Add(., b1)
    act: ir.Node
    down: ir.Node  # MatMul(h, W2)

    form = "ffn"
    group = 1  # columns of the rows per unit

    @property
    def name(self) -> str:
        return self.up.name or self.up.op_type

    @property
    def hidden(self) -> ir.Value:
        """The activation output h, the rows the importance and the refit read."""
        return self.act.outputs[0]

    @property
    def out(self) -> ir.Value:
        return self.down.outputs[0]

    @property
    def w1(self) -> np.ndarray:
        return const_array(self.up.inputs[1])

    @property
    def b1(self) -> np.ndarray | None:
        return None if self.up_bias is None else const_array(_bias_input(self.up_bias))

    @property
    def w2(self) -> np.ndarray:
        return const_array(self.down.inputs[1])

    @property
    def width(self) -> int:
        return self.w1.shape[1]

    @property
    def units(self) -> int:
        return self.width

    @property
    def rows(self) -> ir.Value:
        return self.hidden

    @property
    def unit_flops(self) -> int:
        """Per token, what one neuron costs: multiply-adds x 2 of its column of W1 and row of W2."""
        return 2 * (self.w1.shape[0] + self.w2.shape[1])

    def shrink(self, graph: ir.Graph, keep: np.ndarray) -> None:
        """Keep neurons `keep` (sorted) in W1 and b1; W2 is written by the caller, refitted."""
        self.up.replace_input_with(1, add_initializer(graph, self.up.inputs[1], np.ascontiguousarray(self.w1[:, keep]), "pruned"))
        if self.up_bias is not None:
            bias_value = _bias_input(self.up_bias)
            index = list(self.up_bias.inputs).index(bias_value)
            self.up_bias.replace_input_with(index, add_initializer(graph, bias_value, np.ascontiguousarray(self.b1[keep]), "pruned"))
        for value in (self.up.outputs[0], *(self.up_bias.outputs if self.up_bias is not None else ()), self.hidden):
            value.shape = None  # the intermediate width changed: inference recomputes it


def _bias_input(add: ir.Node) -> ir.Value:
    return next(v for v in add.inputs if const_array(v) is not None)


def _only_reader(value: ir.Value) -> tuple[ir.Node, int] | str:
    uses = list(value.uses())
    if value.is_graph_output():
        return f"'{value.name}' is a graph output"
    if len(uses) != 1:
        return f"'{value.name}' has {len(uses)} readers"
    return uses[0].node, uses[0].idx


def _weight(node: ir.Node) -> np.ndarray | None:
    w = const_array(node.inputs[1]) if len(node.inputs) == 2 else None
    return w if w is not None and w.ndim == 2 else None


def find_ffn(graph: ir.Graph) -> tuple[list[FfnSite], dict[str, str]]:
    """(sites in graph order, {node: why it is not one} for MatMuls into an activation that are not)."""
    sites, refused = [], {}
    for node in graph:
        if (node.domain, node.op_type) != ("", "MatMul") or _weight(node) is None or _weight(node).shape[1] < 2:
            continue
        w1 = _weight(node)
        value, bias = node.outputs[0], None
        reader = _only_reader(value)
        if isinstance(reader, str):
            continue
        if (reader[0].domain, reader[0].op_type) == ("", "Add"):
            b = const_array(reader[0].inputs[1 - reader[1]])
            if b is None or b.shape != (w1.shape[1],):
                continue
            bias, value = reader[0], reader[0].outputs[0]
            reader = _only_reader(value)
            if isinstance(reader, str):
                continue
        act = reader[0]
        if (act.domain, act.op_type) not in ACTIVATIONS or len(act.inputs) != 1:
            continue
        name = node.name or node.op_type
        reader = _only_reader(act.outputs[0])
        if isinstance(reader, str):
            refused[name] = f"its activation output {reader}: a neuron cannot be removed from every reader"
            continue
        down, index = reader
        w2 = _weight(down) if (down.domain, down.op_type) == ("", "MatMul") else None
        if w2 is None or index != 0 or w2.shape[0] != w1.shape[1]:
            refused[name] = f"its activation is read by {down.op_type} '{down.name}', not a MatMul with a constant [{w1.shape[1]}, N] weight"
            continue
        sites.append(FfnSite(node, bias, act, down))
    return sites, refused
