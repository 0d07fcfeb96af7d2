"""Canonical attention: one op for every exported form of scaled-dot-product attention.

Inputs are Q [.., S, D], KT = K^T [.., D, T] (K transposed, as every exporter feeds the scores
MatMul: rank-generic, and a lowering composes the transpose it needs), V [.., T, Dv] and, for
MaskedAttention, an additive bias broadcastable to [.., S, T] (boolean masks become
Where(mask, 0, fill) outside the op). Grouped-query K/V arrive already repeated to the query
heads; `kv_num_heads` records the count before the repeat. Attributes other than `scale`
describe the layer for lowerings and mixers: q_num_heads, kv_num_heads, head_size
(0 = unknown), causal (1 = the bias hides future keys), rope (1 = Q and K are rotated before
the op), mask ("none", "additive", "boolean").
"""

from __future__ import annotations

from graphopt.functions import DOMAIN, FLOAT, INT, STRING, define
from graphopt.ir import ir

ATTENTION = "Attention"
MASKED_ATTENTION = "MaskedAttention"
ATTENTION_OPS = (ATTENTION, MASKED_ATTENTION)
ATTRIBUTE_TYPES = (("scale", FLOAT), ("q_num_heads", INT), ("kv_num_heads", INT), ("head_size", INT), ("causal", INT),
                   ("rope", INT), ("mask", STRING))
ATTENTION_ATTRIBUTES = tuple(name for name, _ in ATTRIBUTE_TYPES)


def is_canonical(node: ir.Node) -> bool:
    return node.domain == DOMAIN and node.op_type in ATTENTION_OPS


def _scores(op, c, q, kt):
    return op.Mul(op.MatMul(q, kt), c.like(c.attr("scale"), q))


@define(ATTENTION, ["Q", "KT", "V"], attributes=ATTRIBUTE_TYPES)
def attention(op, c, q, kt, v):
    """Y = softmax(scale Q K^T) V."""
    return op.MatMul(op.Softmax(_scores(op, c, q, kt), axis=-1), v)


@define(MASKED_ATTENTION, ["Q", "KT", "V", "bias"], attributes=ATTRIBUTE_TYPES)
def masked_attention(op, c, q, kt, v, bias):
    """Y = softmax(scale Q K^T + bias) V."""
    return op.MatMul(op.Softmax(op.Add(_scores(op, c, q, kt), bias), axis=-1), v)


# The attention products in int8 (passes/precision/products.py): the softmax probabilities P go
# through QuantizeLinear / DequantizeLinear (uint8, per tensor) before P V; Q, K and V are
# quantized outside the op, where their projections write them. Not canonical: no lowering or
# mixer takes them for plain attention.
QUANTIZED = {ATTENTION: "QuantizedAttention", MASKED_ATTENTION: "QuantizedMaskedAttention"}


def _quantized(op, p, scale, zero_point):
    return op.DequantizeLinear(op.QuantizeLinear(p, scale, zero_point), scale, zero_point)


@define(QUANTIZED[ATTENTION], ["Q", "KT", "V", "p_scale", "p_zero_point"], attributes=ATTRIBUTE_TYPES)
def quantized_attention(op, c, q, kt, v, p_scale, p_zero_point):
    """Y = DQ(Q(softmax(scale Q K^T))) V."""
    return op.MatMul(_quantized(op, op.Softmax(_scores(op, c, q, kt), axis=-1), p_scale, p_zero_point), v)


@define(QUANTIZED[MASKED_ATTENTION], ["Q", "KT", "V", "bias", "p_scale", "p_zero_point"], attributes=ATTRIBUTE_TYPES)
def quantized_masked_attention(op, c, q, kt, v, bias, p_scale, p_zero_point):
    """Y = DQ(Q(softmax(scale Q K^T + bias))) V."""
    p = op.Softmax(op.Add(_scores(op, c, q, kt), bias), axis=-1)
    return op.MatMul(_quantized(op, p, p_scale, p_zero_point), v)
