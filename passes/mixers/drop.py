"""Layer dropping: the attention sub-layer removed from the residual stream. Training-free and
exact as a graph edit; layers are ranked by residual-stream redundancy cos(X, X + A) (X the
stream entering the block, A what attention adds): near 1, dropping it changes little."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from graphopt import calibration
from graphopt.ir import ir
from graphopt.passes._edits import replace_value
from graphopt.passes._weights import const_array
from graphopt.passes.mixers import edit, spec as specs


def _nan_guard(value: ir.Value) -> ir.Value | None:
    """The output of Where(IsNaN(value), 0, value) when that is all that reads `value`."""
    readers = [n for n, _ in value.uses()]
    if len(readers) != 2 or value.is_graph_output():
        return None
    isnan = next((n for n in readers if n.op_type == "IsNaN"), None)
    where = next((n for n in readers if n.op_type == "Where"), None)
    if isnan is None or where is None or where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not value:
        return None
    return where.outputs[0]


def residual_add(node: ir.Node) -> tuple[ir.Node, ir.Value, ir.Value] | None:
    """(the residual Add, the residual stream X, the attention branch A) that the canonical
    op's output path (NaN guard, layout ops, output projection, bias) feeds, or None."""
    value = node.outputs[0]
    for _ in range(10):
        guard = _nan_guard(value)
        if guard is not None:
            value = guard
            continue
        readers = value.uses()
        if len(readers) != 1 or value.is_graph_output():
            return None
        reader, _index = readers[0]
        if reader.op_type == "Add" and reader.domain == "":
            other = reader.inputs[1] if reader.inputs[0] is value else reader.inputs[0]
            if const_array(other) is None:  # the residual stream
                return reader, other, value
        value = reader.outputs[0]
    return None


def redundancy(model, batches: Sequence, nodes: Sequence[ir.Node]) -> list[float | None]:
    """Per attention sub-layer, the mean over real tokens of cos(X, X + A); None where no
    residual Add is found."""
    found = [residual_add(n) for n in nodes]
    results = calibration.run_exposed(model, [v.name for f in found if f is not None for v in f[1:]], batches)
    scores: list[float | None] = []
    for f in found:
        if f is None:
            scores.append(None)
            continue
        cosines = []
        for r, feeds in zip(results, batches):
            x = r[f[1].name].astype(np.float64)
            y = x + r[f[2].name]
            cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-30)
            mask = feeds.get("attention_mask")
            cosines.append(cos[mask.astype(bool)] if mask is not None and mask.shape == cos.shape else cos.ravel())
        scores.append(round(float(np.concatenate(cosines).mean()), 6))
    return scores


class Drop(specs.MixerKind):
    kind = "drop"
    names = ("drop",)

    def output(self, spec, node, q, kt, v, bias, w):
        import torch

        return torch.zeros_like(q[..., : v.shape[-1]])

    def scores(self, model, batches, nodes):
        """The rank of a layer to drop: cos(X, X + Attn(Norm(X))) on the residual stream."""
        return {"redundancy": redundancy(model, batches, nodes)}

    def swap(self, model, node, spec, w, *, quadratic, layer):
        """The residual Add that the attention output path feeds is bypassed."""
        b = edit.Builder(model, node)
        found = residual_add(node)
        if found is not None:
            add, residual, _branch = found
            replace_value(b.graph, add.outputs[0], residual)
            b.install(None)
            return f"dropped: residual Add '{add.name}' bypassed"
        # No residual Add found: the mixer outputs zeros (the projection's bias still adds).
        zeros = b.add("ConstantOfShape", [b.add("Shape", [node.inputs[0]])],
                      value=ir.AttrTensor("value", ir.tensor(np.zeros(1, np.float32))))
        b.install(zeros)
        return "dropped: no residual Add found; the attention output is zero"


specs.register(Drop())
