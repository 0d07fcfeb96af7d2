"""Lowerings for OpenVINO's CPU plugin: standard ONNX written in the form its fusions take.

Both passes are exact (the function is unchanged) and run only on the way to OpenVINO
(backends/openvino.LOWERING, after make-portable), never on a model that stays in ONNX Runtime,
whose fused attention reads the merged projection. What they fix, measured on BERT-base int8 at
batch 32 (OpenVINO 2026.4, AMD EPYC, 2026-12-02; RESULTS.md):
    split-parallel-linears   the merged Q/K/V projection's Split runs as OpenVINO's reference
                             VariadicSplit (10.5 ms of 564), and a quantizer on Q or K after it
                             cannot fuse into the projection's output
    heads-first-keys         K's Transpose(0, 2, 3, 1) is not taken into the fused attention
                             subgraph (18 ms of Transposes); written as (0, 2, 1, 3) then the
                             last-two-axes swap, both are (6 ms)
"""

from __future__ import annotations

import numpy as np

from graphopt import ops
from graphopt.ir import ir
from graphopt.passes._weights import add_initializer, const_array
from graphopt.registry import register
from graphopt.rewrite import RULE_TAG, Pass, PassKind

HEADS_KEYS_PERM = (0, 2, 3, 1)  # [B, S, H, D] -> [B, H, D, S]
HEADS_PERM = (0, 2, 1, 3)       # [B, S, H, D] -> [B, H, S, D]
SWAP_LAST = (0, 1, 3, 2)


def _sole_reader(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0][0]


def _split_sizes(split: ir.Node) -> list[int] | None:
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = const_array(split.inputs[1])
        return None if sizes is None else [int(s) for s in sizes]
    sizes = split.attributes.get_ints("split", None)
    return None if sizes is None else list(sizes)


@register
class SplitParallelLinears(Pass):
    """Split a merged projection back into one MatMul per part (the inverse of merge-parallel-linears).

    Math (W = [W_1 | ... | W_n] of shape [K, N], b likewise, Split along the last axis into N_i):
        Split(x W + b) = (x W_1 + b_1, ..., x W_n + b_n)
    and with a per-output-channel DequantizeLinear weight, DQ(Wq, s, z) = [DQ(Wq_i, s_i, z_i)]:
    the slices along the channel axis dequantize alone.
    Preconditions:
        1. A Split along the last axis with constant sizes reads MatMul(x, W) (+ Add with a
           constant vector b of length N), and nothing else reads the MatMul or the Add.
        2. W is a constant 2-D matrix, or DequantizeLinear(Wq, s, z) of constants with axis 1
           and s, z vectors of length N.
    """

    name = "split-parallel-linears"
    kind = PassKind.LOWERING
    RULE = "SplitParallelLinears"

    def run(self, model: ir.Model) -> dict[str, int]:
        done = 0
        for split in [n for n in model.graph if (n.domain, n.op_type) == ops.SPLIT]:
            found = self._match(split)
            if isinstance(found, str):
                continue
            self._split(model.graph, split, *found)
            done += 1
        return {self.RULE: done}

    def explain(self, model: ir.Model) -> list[str]:
        return [f"{self.RULE}: Split '{n.name}' left merged: {why}" for n in model.graph
                if (n.domain, n.op_type) == ops.SPLIT and isinstance(why := self._match(n), str)]

    @staticmethod
    def _match(split: ir.Node):
        """(matmul, weight form, bias array or None, sizes), or why not (preconditions 1, 2)."""
        sizes = _split_sizes(split)
        rank = split.inputs[0].shape.rank() if split.inputs[0].shape is not None else None
        axis = split.attributes.get_int("axis", 0)
        if sizes is None or not (axis == -1 or (rank is not None and axis == rank - 1)):
            return "not a split of the last axis into constant sizes"
        node, bias = split.inputs[0].producer(), None
        if node is not None and (node.domain, node.op_type) == ops.ADD:
            for i in (0, 1):
                inner, b = node.inputs[i].producer(), const_array(node.inputs[1 - i])
                if inner is not None and (inner.domain, inner.op_type) == ops.MATMUL and b is not None:
                    if _sole_reader(node.outputs[0]) is not split or b.shape != (sum(sizes),):
                        return "the bias Add has other readers or its bias is not a vector over the split axis"
                    node, bias = inner, b
                    break
        if node is None or (node.domain, node.op_type) != ops.MATMUL:
            return "it does not read a MatMul (+ bias)"
        if _sole_reader(node.outputs[0]) is not (split if bias is None else node.outputs[0].uses()[0][0]):
            return f"MatMul '{node.name}' has other readers"
        w = node.inputs[1]
        if (array := const_array(w)) is not None:
            return (node, array, bias, sizes) if array.ndim == 2 and array.shape[1] == sum(sizes) \
                else "the weight is not a [K, N] matrix"
        dq = w.producer()
        if dq is None or (dq.domain, dq.op_type) != ops.DEQUANTIZE_LINEAR or dq.attributes.get_int("axis", 1) != 1:
            return "the weight is neither constant nor dequantized along its output channels"
        parts = [const_array(v) for v in dq.inputs]
        if len(parts) < 3 or any(p is None for p in parts) or parts[0].ndim != 2 or parts[0].shape[1] != sum(sizes) \
                or parts[1].shape != (sum(sizes),) or parts[2].shape != (sum(sizes),):
            return "the dequantized weight's int8 matrix, scales and zero points are not per output channel constants"
        return node, parts, bias, sizes

    def _split(self, graph: ir.Graph, split: ir.Node, matmul: ir.Node, weight, bias, sizes) -> None:
        x = matmul.inputs[0]
        made = []
        start = 0
        for size, out in zip(sizes, split.outputs):
            part = slice(start, start + size)
            start += size
            if isinstance(weight, np.ndarray):
                w = add_initializer(graph, matmul.inputs[1], weight[:, part], "part")
            else:
                dq = matmul.inputs[1].producer()
                sliced = [add_initializer(graph, v, a[:, part] if a.ndim == 2 else a[part], "part")
                          for v, a in zip(dq.inputs, weight)]
                made.append(ir.node("DequantizeLinear", sliced, attributes={"axis": 1}))
                w = made[-1].outputs[0]
            made.append(ir.node("MatMul", [x, w]))
            y = made[-1].outputs[0]
            if bias is not None:
                made.append(ir.node("Add", [y, add_initializer(graph, None, bias[part], "part_bias")]))
                y = made[-1].outputs[0]
            y.name, y.type, y.shape = out.name, out.type, out.shape
            out.name = None
            out.replace_all_uses_with(y, replace_graph_outputs=True)
        for node in made:
            node.metadata_props[RULE_TAG] = self.RULE
        graph.insert_before(matmul, made)
        chain = [split, *([split.inputs[0].producer()] if bias is not None else []), matmul]
        dq = matmul.inputs[1].producer()
        graph.remove(chain, safe=True)
        if dq is not None and not list(dq.outputs[0].uses()):
            graph.remove(dq, safe=True)


@register
class HeadsFirstKeys(Pass):
    """Write K's transpose to [B, H, D, S] as the heads transpose, then the last-two-axes swap.

    Math: Transpose(x, (0, 2, 3, 1)) = Transpose(Transpose(x, (0, 2, 1, 3)), (0, 1, 3, 2)).
    Preconditions:
        1. The Transpose's perm is (0, 2, 3, 1).
        2. Every reader is a MatMul reading it as its second input (the key of Q K^T).
    """

    name = "heads-first-keys"
    kind = PassKind.LOWERING
    RULE = "HeadsFirstKeys"

    def run(self, model: ir.Model) -> dict[str, int]:
        done = 0
        for node in [n for n in model.graph if self._applies(n)]:
            first = ir.node("Transpose", [node.inputs[0]], attributes={"perm": list(HEADS_PERM)})
            swap = ir.node("Transpose", [first.outputs[0]], attributes={"perm": list(SWAP_LAST)})
            for made in (first, swap):
                made.metadata_props[RULE_TAG] = self.RULE
            out = node.outputs[0]
            swap.outputs[0].name, swap.outputs[0].type, swap.outputs[0].shape = out.name, out.type, out.shape
            if out.shape is not None and len(out.shape) == 4:
                d = list(out.shape)
                first.outputs[0].type, first.outputs[0].shape = out.type, ir.Shape([d[0], d[1], d[3], d[2]])
            out.name = None
            model.graph.insert_before(node, [first, swap])
            out.replace_all_uses_with(swap.outputs[0])
            model.graph.remove(node, safe=True)
            done += 1
        return {self.RULE: done}

    @staticmethod
    def _applies(node: ir.Node) -> bool:
        if (node.domain, node.op_type) != ops.TRANSPOSE or tuple(node.attributes.get_ints("perm", ())) != HEADS_KEYS_PERM:
            return False
        uses = list(node.outputs[0].uses())
        return bool(uses) and not node.outputs[0].is_graph_output() and \
            all((n.domain, n.op_type) == ops.MATMUL and i == 1 for n, i in uses)

    def explain(self, model: ir.Model) -> list[str]:
        return [f"{self.RULE}: Transpose '{n.name}' (perm 0,2,3,1) kept: a reader is not a MatMul's second input"
                for n in model.graph if (n.domain, n.op_type) == ops.TRANSPOSE
                and tuple(n.attributes.get_ints("perm", ())) == HEADS_KEYS_PERM and not self._applies(n)]
