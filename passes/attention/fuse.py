"""fuse-attention: each decomposed scaled-dot-product attention becomes one canonical op.

The canonical op (graphopt::Attention / graphopt::MaskedAttention, defined with their
reference bodies in graphopt/library/attention.py) is what the lowerings, the mixers and
`graphopt inspect` read. Detection is passes/attention/detect.py; this pass checks that a
detected site can be replaced exactly and replaces it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt import functions
from graphopt.library.attention import ATTENTION, MASKED_ATTENTION
from graphopt.passes.attention.detect import AttentionSite, find_attention, scores_before
from graphopt.ir import common_passes, ir
from graphopt.passes.attention.masks import classify_causal
from graphopt.passes._checks import scalar
from graphopt.passes._edits import replace_value
from graphopt.passes._weights import add_initializer, const_array
from graphopt.registry import register
from graphopt.rewrite import RULE_TAG, Pass, PassKind

RULE = "FuseAttention"


@dataclasses.dataclass
class _Plan:
    site: AttentionSite
    q: ir.Value
    kt: ir.Value
    v: ir.Value
    scale: float
    adds: list[ir.Value]  # additive mask terms, in graph order
    wheres: list[tuple[ir.Value, ir.Value, bool]]  # (condition, fill, fill where the condition is true)
    nan_guard: bool

    @property
    def mask(self) -> str:
        return "additive" if self.adds else "boolean" if self.wheres else "none"


@register
class FuseAttention(Pass):
    """Replace each decomposed scaled-dot-product attention by one canonical graphopt attention op.

    Math (c: the product of every constant scale on the scores and on Q and K; B: the sum
    of the mask terms):
        softmax(c (Q K^T) + B) V
        an additive mask M contributes M; a boolean mask Where(m, x, f) = x + Where(m, 0, f)
        (f is -inf or the dtype's lowest value, which absorbs every finite score in rounding);
        SDPA's guard Where(IsNaN(P), 0, P) V = Where(IsNaN(Y), 0, Y): a row of P is NaN as a
        whole (a fully masked query), and so is the same row of Y.
    Preconditions:
        1. Softmax over the last axis of a MatMul of two activations (the scores), read by a
           MatMul with V (found by passes/attention/detect.py).
        2. Between the scores and Softmax only: Mul/Div by scalar constants, before any mask;
           Add of a tensor not computed from the scores; Where(m, scores, scalar fill) either
           way round; Cast to the type it already has.
        3. Between Softmax and the output MatMul only: the NaN guard, Identity, Dropout
           (inference), same-type Cast.
        4. Every value from the scores to the output is read only inside the attention (a
           model returning its attention probabilities keeps them).
    """

    name = "fuse-attention"
    kind = PassKind.EXACT
    requires_shapes = True  # heads and head size for the layer metadata

    def run(self, model: ir.Model) -> dict[str, int]:
        made = []
        for site in find_attention(model.graph):
            if site.canonical is None and not isinstance(plan := _plan(site), str):
                made.append(_replace(model.graph, plan))
        if made:
            common_passes.RemoveUnusedNodesPass()(model)
            biases = {n.inputs[3].name: n.inputs[3] for n in made if len(n.inputs) > 3}
            causal = classify_causal(model, list(biases.values())) if biases else {}
            for n in made:
                if len(n.inputs) > 3 and causal.get(n.inputs[3].name):
                    n.attributes["causal"] = ir.AttrInt64("causal", 1)
        return {RULE: len(made)}

    def explain(self, model: ir.Model) -> list[str]:
        lines, detected = [], set()
        for site in find_attention(model.graph):
            detected.add(site.softmax)
            if site.canonical is None and isinstance(reason := _plan(site), str):
                lines.append(f"{RULE}: Softmax '{site.softmax.name}': {reason}")
        for node in model.graph:  # softmax-weighted sums the detector did not take for attention
            if node.op_type != "Softmax" or node.domain != "" or node in detected:
                continue
            if scores_before(node) is not None:
                readers = ", ".join(f"{r.op_type} '{r.name}'" for r, _ in node.outputs[0].uses()) or "nothing"
                lines.append(f"{RULE}: Softmax '{node.name}': its output ({readers}) does not reach a MatMul with V "
                             "through only the NaN guard and no-ops; an op between Softmax and the output MatMul is not supported")
            elif any(r.op_type == "MatMul" for r, _ in node.outputs[0].uses()):
                source = node.inputs[0].producer()
                found = f"{source.op_type} '{source.name}'" if source is not None else f"'{node.inputs[0].name}'"
                lines.append(f"{RULE}: Softmax '{node.name}': its input comes from {found}, not from attention scores "
                             "(a MatMul of two activations, then only scales, masks and no-op casts)")
        return lines


def _plan(site: AttentionSite) -> _Plan | str:
    """What the canonical op needs for `site`, or the first precondition that fails."""
    scale = 1.0
    adds, wheres = [], []
    # 2. From Softmax's input back to the scores.
    value, scaled_after = site.softmax.inputs[0], None
    while (node := value.producer()) is not site.scores:
        if node is None:
            return f"'{value.name}' on the way from Softmax to the scores is not computed from them"
        if reason := _readers_blocker(node.outputs[0], 1):
            return reason
        op, inputs = node.op_type, node.inputs
        if op in ("Mul", "Div"):
            data_index = 0 if op == "Div" or const_array(inputs[1]) is not None else 1
            c = scalar(inputs[1 - data_index])
            if c is None or c == 0:
                return f"{op} '{node.name}' on the scores is not by a non-zero scalar constant"
            scale *= c if op == "Mul" else 1.0 / c
            scaled_after = scaled_after or node
        elif op in ("Add", "Where") and scaled_after is not None:
            return f"mask {op} '{node.name}' comes before scale {scaled_after.op_type} '{scaled_after.name}'; the canonical op scales before masking"
        elif op == "Add":
            data_index = 0 if _from_scores(inputs[0], site.scores) else 1
            if _from_scores(inputs[1 - data_index], site.scores):
                return f"both inputs of Add '{node.name}' are computed from the scores"
            adds.insert(0, inputs[1 - data_index])
        elif op == "Where":
            data_index = 1 if _from_scores(inputs[1], site.scores) else 2
            fill = inputs[3 - data_index]
            if scalar(fill) is None or _from_scores(inputs[0], site.scores):
                return f"Where '{node.name}' is not a mask (condition, scores, scalar fill)"
            wheres.insert(0, (inputs[0], fill, data_index == 2))
        elif op == "Cast" and node.attributes.get_int("to", 0) == (inputs[0].dtype.value if inputs[0].dtype else -1):
            data_index = 0
        else:
            return f"{op} '{node.name}' between the scores and Softmax is not a scale, a mask or a no-op cast"
        value = inputs[data_index]
    # 3. From Softmax's output to the output MatMul.
    value, guard = site.softmax.outputs[0], False
    while True:
        readers = [n for n, _ in value.uses()]
        if site.output in readers:
            if reason := _readers_blocker(value, 1):
                return reason
            break
        isnan = [n for n in readers if n.op_type == "IsNaN"]
        if isnan and len(readers) == 2:
            where = next(n for n in readers if n.op_type == "Where")
            if where.inputs[0] is not isnan[0].outputs[0] or where.inputs[2] is not value or scalar(where.inputs[1]) != 0:
                return f"Where '{where.name}' after Softmax is not the NaN guard Where(IsNaN(P), 0, P)"
            guard, value = True, where.outputs[0]
            continue
        if reason := _readers_blocker(value, 1):
            return reason
        node = readers[0]
        if node.op_type in ("Identity", "Dropout") or (
                node.op_type == "Cast" and node.attributes.get_int("to", 0) == (value.dtype.value if value.dtype else -1)):
            if node.op_type == "Dropout" and (len(node.inputs) > 2 and node.inputs[2] is not None):
                return f"Dropout '{node.name}' has a training_mode input"
            value = node.outputs[0]
            continue
        return f"{node.op_type} '{node.name}' between Softmax and the output MatMul is not a no-op or the NaN guard"
    # 4. The scores themselves.
    if reason := _readers_blocker(site.scores.outputs[0], 1):
        return reason
    q, q_scale = _unscaled(site.scores.inputs[0])
    kt, k_scale = _unscaled(site.scores.inputs[1])
    return _Plan(site, q, kt, site.output.inputs[1], scale * q_scale * k_scale, adds, wheres, guard)


def _unscaled(value: ir.Value) -> tuple[ir.Value, float]:
    """(x, c) for value = x * c with c a scalar constant that only this attention reads, else (value, 1)."""
    node = value.producer()
    if node is None or node.domain != "" or node.op_type not in ("Mul", "Div") or len(value.uses()) != 1 or value.is_graph_output():
        return value, 1.0
    data_index = 0 if node.op_type == "Div" or const_array(node.inputs[1]) is not None else 1
    c = scalar(node.inputs[1 - data_index])
    if c is None or c == 0:
        return value, 1.0
    return node.inputs[data_index], c if node.op_type == "Mul" else 1.0 / c


def _from_scores(value: ir.Value | None, scores: ir.Node, depth: int = 8) -> bool:
    node = value.producer() if value is not None else None
    if node is None or depth == 0:
        return False
    return node is scores or any(_from_scores(v, scores, depth - 1) for v in node.inputs)


def _readers_blocker(value: ir.Value, expected: int) -> str | None:
    if value.is_graph_output():
        return f"'{value.name}' is a graph output (the model returns attention internals)"
    readers = value.uses()
    if len(readers) != expected:
        return f"'{value.name}' is read {len(readers)} times, outside the attention too"
    return None


def _replace(graph: ir.Graph, plan: _Plan) -> ir.Node:
    site, out = plan.site, plan.site.output
    new: list[ir.Node] = []
    bias = None
    for cond, fill, fill_when_true in plan.wheres:
        zero = add_initializer(graph, fill, np.zeros((), dtype=const_array(fill).dtype), "zero")
        node = ir.node("Where", [cond, fill, zero] if fill_when_true else [cond, zero, fill], name=f"{site.softmax.name}_mask")
        new.append(node)
        bias = _add(new, bias, node.outputs[0], site)
    for term in plan.adds:
        bias = _add(new, bias, term, site)
    attrs = {
        "scale": ir.AttrFloat32("scale", plan.scale),
        "q_num_heads": ir.AttrInt64("q_num_heads", site.heads or 0),
        "kv_num_heads": ir.AttrInt64("kv_num_heads", site.kv_heads or 0),
        "head_size": ir.AttrInt64("head_size", site.head_size or 0),
        "causal": ir.AttrInt64("causal", 0),
        "rope": ir.AttrInt64("rope", int(site.rope)),
        "mask": ir.AttrString("mask", plan.mask),
    }
    op_type = MASKED_ATTENTION if bias is not None else ATTENTION
    inputs = [plan.q, _direct_kt(new, plan.kt), plan.v] + ([bias] if bias is not None else [])
    attention = ir.node(op_type, inputs, attributes=attrs, domain=functions.DOMAIN, name=f"{site.softmax.name}_attention")
    new.append(attention)
    result = attention.outputs[0]
    if plan.nan_guard:
        isnan = ir.node("IsNaN", [result], name=f"{attention.name}_isnan")
        zero = add_initializer(graph, None, np.zeros((), dtype=_result_dtype(out)), "attention_zero")
        guard = ir.node("Where", [isnan.outputs[0], zero, result], name=f"{attention.name}_guard")
        new += [isnan, guard]
        result = guard.outputs[0]
    for node in new:
        node.metadata_props[RULE_TAG] = RULE
    graph.insert_before(out, new)
    old = out.outputs[0]
    result.type, result.shape = old.type, old.shape
    attention.outputs[0].type, attention.outputs[0].shape = old.type, old.shape
    replace_value(graph, old, result)
    return attention


def _direct_kt(new: list[ir.Node], kt: ir.Value) -> ir.Value:
    """K^T as one 4-D Transpose where the exporter built it through rank 3.

    torch's dynamo export of SDPA transposes K as Reshape(Transpose(Reshape(K, [B*H, T, D]),
    [0, 2, 1]), [B, H, D, T]): merging the two leading axes, swapping the last two and
    splitting the leading axis again is Transpose(K, [0, 1, 3, 2]), composed here with the
    Transpose that made K. Shapes decide it (inferred dims, symbolic ones compared by name).
    """
    outer = kt.producer()
    if outer is None or outer.op_type != "Reshape" or outer.domain != "":
        return kt
    swap = outer.inputs[0].producer()
    if swap is None or swap.op_type != "Transpose" or list(swap.attributes.get_ints("perm", [])) != [0, 2, 1]:
        return kt
    inner = swap.inputs[0].producer()
    if inner is None or inner.op_type != "Reshape":
        return kt
    k, merged = inner.inputs[0], inner.outputs[0]
    if k.shape is None or merged.shape is None or kt.shape is None or len(k.shape) != 4 or len(merged.shape) != 3 or len(kt.shape) != 4:
        return kt
    if not (_same(merged.shape[1:], k.shape[2:]) and _same(kt.shape[:2], k.shape[:2])
            and _same(kt.shape[2:], [k.shape[3], k.shape[2]])):
        return kt
    source, perm = k, [0, 1, 3, 2]
    producer = k.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.domain == "":
        p = list(producer.attributes.get_ints("perm", []))
        source, perm = producer.inputs[0], [p[0], p[1], p[3], p[2]]
    node = ir.node("Transpose", [source], attributes={"perm": perm})
    new.append(node)
    node.outputs[0].type, node.outputs[0].shape = kt.type, kt.shape
    return node.outputs[0]


def _same(a, b) -> bool:
    """Dims known equal: equal ints, or the same named symbolic dim."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, int) or isinstance(y, int):
            if x != y:
                return False
        elif x.value is None or x.value != y.value:
            return False
    return True


def _result_dtype(node: ir.Node):
    dtype = node.outputs[0].dtype or node.inputs[0].dtype or ir.DataType.FLOAT
    return dtype.numpy()


def _add(new: list[ir.Node], bias: ir.Value | None, term: ir.Value, site: AttentionSite) -> ir.Value:
    if bias is None:
        return term
    node = ir.node("Add", [bias, term], name=f"{site.softmax.name}_bias")
    new.append(node)
    return node.outputs[0]

