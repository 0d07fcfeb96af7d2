"""Find scaled-dot-product attention in an exported graph (analysis only; no rewrite).

Every form torch's dynamo and legacy exporters emit for transformers' eager and SDPA
attention shares one skeleton:

    scores = MatMul(Q, K^T)            both operands activations
    [Mul/Div by a scale]               absent once fold-attention-scale ran
    [Add(mask) | Where(mask, ., -inf)] additive or boolean mask
    P = Softmax(., axis=-1)
    [Where(IsNaN(P), 0, P)] [Cast]     SDPA's NaN guard, dtype islands
    out = MatMul(P, V)

`find_attention` walks out from each Softmax along that skeleton and records what it
finds per layer: heads, key/value heads (grouped-query models repeat K/V with
Expand), head size, mask kind, and whether Q is rotated (RoPE's Neg + Concat).
It also lists the canonical attention ops `fuse-attention` made (graphopt::Attention,
graphopt::MaskedAttention), from their attributes: one detection for every consumer
(the rewrite, `graphopt inspect`, the lowerings, the mixers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from graphopt.ir import ir
from graphopt.library.attention import is_canonical

_SCORE_SIDE = frozenset({"Add", "Mul", "Div", "Where", "Cast", "Sub"})  # between scores and Softmax
_PROB_SIDE = frozenset({"Where", "Cast", "Dropout", "Identity", "IsNaN"})  # between Softmax and P @ V
_LAYOUT = frozenset({"Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze", "Concat", "Slice", "Neg", "Mul", "Add",
                     "Cast", "Identity", "Split"})


@dataclasses.dataclass
class AttentionSite:
    """One attention layer: decomposed (softmax, scores and output set) or canonical (`canonical` set)."""

    softmax: ir.Node | None
    scores: ir.Node | None  # MatMul(Q, K^T)
    output: ir.Node  # MatMul(P, V), or the canonical op
    heads: int | None
    kv_heads: int | None
    head_size: int | None
    mask: str  # "none", "additive", "boolean"
    scaled: bool  # a constant scale still sits between scores and Softmax
    rope: bool
    causal: bool | None = None  # None: not classified (fuse-attention classifies)
    canonical: ir.Node | None = None

    @property
    def name(self) -> str:
        node = self.canonical or self.softmax
        return node.name or node.op_type

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.name, "canonical": self.canonical is not None, "heads": self.heads,
                "kv_heads": self.kv_heads, "head_size": self.head_size, "mask": self.mask, "scaled": self.scaled,
                "rope": self.rope, "causal": self.causal}


def find_attention(graph: ir.Graph) -> list[AttentionSite]:
    """Attention sites in graph order (shapes help: run shape inference first)."""
    sites = []
    for node in graph:
        if is_canonical(node):
            sites.append(_canonical_site(node))
            continue
        if node.domain != "" or node.op_type != "Softmax" or node.attributes.get_int("axis", -1) not in (-1, _rank(node.inputs[0]) - 1):
            continue
        found = _walk_back(node.inputs[0])
        output = _walk_forward(node.outputs[0])
        if found is None or output is None:
            continue
        scores, mask, scaled = found
        q, k = scores.inputs
        heads = _dim(q, 1) or _reshape_heads(q)
        sites.append(AttentionSite(node, scores, output, heads, _kv_heads(k, heads), _last_dim(q),
                                   mask, scaled, _reaches(q, {"Neg"}) and _reaches(q, {"Concat"})))
    return sites


def scores_before(softmax: ir.Node) -> ir.Node | None:
    """The scores MatMul a Softmax reads through scales and masks, or None."""
    found = _walk_back(softmax.inputs[0])
    return found[0] if found else None


def _canonical_site(node: ir.Node) -> AttentionSite:
    a = node.attributes

    def known(key: str) -> int | None:
        return a.get_int(key, 0) or None

    return AttentionSite(None, None, node, known("q_num_heads"), known("kv_num_heads"), known("head_size"),
                         a.get_string("mask", "none"), a.get_float("scale", 1.0) != 1.0, bool(a.get_int("rope", 0)),
                         bool(a.get_int("causal", 0)), node)


def _split_heads(reshape: ir.Node) -> int | None:
    """H of a Reshape to [.., H, D]: the constant entries of its shape (legacy exports build it
    with Concat of computed batch/sequence sizes and constants), with H = -1 meaning hidden / D."""
    target = reshape.inputs[1]
    array = _const_array(target)
    if array is not None and array.size >= 2:
        h, d = (int(x) for x in array.reshape(-1)[-2:])
    else:
        concat = target.producer()
        if concat is None or concat.op_type != "Concat" or len(concat.inputs) < 2:
            return None
        parts = [_const_array(v) for v in concat.inputs[-2:]]
        if any(p is None or p.size != 1 for p in parts):
            return None
        h, d = (int(p.reshape(-1)[0]) for p in parts)
    if h > 0:
        return h
    hidden = _last_dim(reshape.inputs[0])
    return hidden // d if h == -1 and d > 0 and hidden and hidden % d == 0 else None


def _is_activation_matmul(node: ir.Node | None) -> bool:
    return node is not None and node.domain == "" and node.op_type == "MatMul" and all(
        v is not None and v.const_value is None and (v.producer() is None or v.producer().op_type != "Constant") for v in node.inputs)


def _walk_back(value: ir.Value, depth: int = 6):
    """(scores MatMul, mask kind, scaled) from the Softmax input back, or None."""
    mask, scaled = "none", False
    for _ in range(depth):
        node = value.producer()
        if node is None:
            return None
        if _is_activation_matmul(node):
            return node, mask, scaled
        if node.domain != "" or node.op_type not in _SCORE_SIDE:
            return None
        data = [v for v in node.inputs if v is not None and _leads_to_scores(v)]
        if len(data) != 1:
            return None
        if node.op_type in ("Add", "Sub"):
            mask = "additive"
        elif node.op_type == "Where":
            mask = "boolean"
        elif node.op_type in ("Mul", "Div"):
            scaled = True
        value = data[0]
    return None


def _leads_to_scores(value: ir.Value, depth: int = 6) -> bool:
    node = value.producer()
    if node is None or depth == 0:
        return False
    if _is_activation_matmul(node):
        return True
    return node.domain == "" and node.op_type in _SCORE_SIDE and any(
        v is not None and _leads_to_scores(v, depth - 1) for v in node.inputs)


def _walk_forward(value: ir.Value, depth: int = 5) -> ir.Node | None:
    """The MatMul(P, V) reading the probabilities, through the NaN guard and casts."""
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for reader, index in v.uses():
                if reader.domain == "" and reader.op_type == "MatMul" and index == 0:
                    return reader
                if reader.domain == "" and reader.op_type in _PROB_SIDE:
                    nxt.extend(reader.outputs)
        frontier = nxt
    return None


def _kv_heads(k: ir.Value, heads: int | None, depth: int = 12) -> int | None:
    """Key/value heads: grouped-query models repeat K as [B, Hkv, S, D] -> Unsqueeze ->
    Expand -> Reshape [B, H, S, D]; the Unsqueeze input's axis 1 is Hkv. No Expand on
    K's path: as many key/value heads as query heads."""
    value = k
    for _ in range(depth):
        node = value.producer()
        if node is None or node.domain != "" or node.op_type not in _LAYOUT or not node.inputs or node.inputs[0] is None:
            return heads
        if node.op_type == "Expand":
            source = node.inputs[0].producer()
            if source is not None and source.op_type == "Unsqueeze":
                before = source.inputs[0]
                return _dim(before, 1) or _reshape_heads(before)
            return None
        value = node.inputs[0]
    return heads


def _reshape_heads(value: ir.Value, depth: int = 10) -> int | None:
    """Heads from the Reshape that splits the hidden size into [.., H, D], found back along
    input 0 through Transposes, Casts and RoPE's Add/Mul, and along the last input of a
    Concat (a KV cache appends the new keys after the past ones)."""
    for _ in range(depth):
        node = value.producer()
        if node is None or node.domain != "":
            return None
        if node.op_type == "Reshape":
            return _split_heads(node)
        if node.op_type == "Concat" and node.inputs:
            value = node.inputs[-1]
        elif node.op_type in ("Transpose", "Cast", "Identity", "Add", "Mul") and node.inputs[0] is not None:
            value = node.inputs[0]
        else:
            return None
    return None


def _reaches(value: ir.Value, ops: set[str], depth: int = 10) -> bool:
    node = value.producer()
    if node is None or depth == 0:
        return False
    if node.op_type in ops:
        return True
    return node.op_type in _LAYOUT and any(v is not None and _reaches(v, ops, depth - 1) for v in node.inputs)


def _const_array(value: ir.Value | None):
    """Constant contents of an initializer or Constant node (core must not import passes)."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def _rank(value: ir.Value | None) -> int:
    return len(value.shape) if value is not None and value.shape is not None else 0


def _dim(value: ir.Value, axis: int) -> int | None:
    if value.shape is None or len(value.shape) < 4:
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


def _last_dim(value: ir.Value) -> int | None:
    if value.shape is None or not len(value.shape):
        return None
    d = value.shape[-1]
    return d if isinstance(d, int) else None
