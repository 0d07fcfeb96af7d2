"""graphopt's high-level ops: model-local ONNX functions in the `graphopt` domain.

Each has a reference body in standard ONNX ops, written for the model's opset,
so every intermediate model still runs in onnxruntime (which inlines the body).
Backends may swap a call for a faster kernel. Rules emit calls; `ensure`
(run by every RulePass) adds the definitions the model is missing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import onnx.parser

from graphopt import ops
from graphopt.ir import ir

DOMAIN = ops.GRAPHOPT_DOMAIN
VERSION = 1


CASTLIKE_OPSET = 15  # below it a body cannot cast constants to x's type: float32 only


def _like(src: str, like: str, out: str, opset: int, plain: bool) -> str:
    """`out` = `src` in the element type of `like`. `plain` (every call is float32, or the
    opset has no CastLike) writes the float32 constant itself: onnxruntime can then fold it
    and its own fusions (GeluFusion, FastGeluFusion) still match the inlined body."""
    return f"{out} = Identity({src})" if plain or opset < CASTLIKE_OPSET else f"{out} = CastLike({src}, {like})"


def call_blocker(x: ir.Value, opset: int) -> str | None:
    """Why a graphopt function cannot be called on `x` at this opset, or None."""
    if opset < CASTLIKE_OPSET and x.dtype != ir.DataType.FLOAT:
        return f"below opset {CASTLIKE_OPSET} graphopt functions are float32-only and '{x.name}' is {x.dtype}"
    return None


def _reduce_mean_last(x: str, out: str, opset: int) -> str:
    if opset >= 18:
        return f"axes_{out} = Constant<value = int64[1] {{-1}}>()\n    {out} = ReduceMean<keepdims = 1>({x}, axes_{out})"
    return f"{out} = ReduceMean<axes = [-1], keepdims = 1>({x})"


def _rms_norm(opset: int, plain: bool) -> str:
    if plain:  # float32: onnxruntime's SimplifiedLayerNormFusion pattern, so the inlined body fuses
        return f"""
RMSNormalization (x, scale, epsilon) => (y) {{
    two = Constant<value = float {{2.0}}>()
    sq = Pow(x, two)
    {_reduce_mean_last("sq", "ms", opset)}
    var = Add(ms, epsilon)
    std = Sqrt(var)
    normed = Div(x, std)
    y = Mul(normed, scale)
}}"""
    # Mirrors the Llama/Qwen/T5 reference: compute in float32, cast back, then scale.
    return f"""
RMSNormalization (x, scale, epsilon) => (y) {{
    xf = Cast<to = 1>(x)
    sq = Mul(xf, xf)
    {_reduce_mean_last("sq", "ms", opset)}
    var = Add(ms, epsilon)
    std = Sqrt(var)
    normed = Div(xf, std)
    {_like("normed", "x", "back", opset, plain)}
    y = Mul(back, scale)
}}"""


def _layer_norm(opset: int, plain: bool) -> str:
    # LayerNormalization-17 semantics over the last axis, for models below opset 17.
    return f"""
LayerNormalization (x, scale, bias, epsilon) => (y) {{
    {_reduce_mean_last("x", "mean", opset)}
    d = Sub(x, mean)
    sq = Mul(d, d)
    {_reduce_mean_last("sq", "var", opset)}
    ve = Add(var, epsilon)
    std = Sqrt(ve)
    normed = Div(d, std)
    scaled = Mul(normed, scale)
    y = Add(scaled, bias)
}}"""


def _gelu(opset: int, plain: bool) -> str:
    return f"""
Gelu (x) => (y) {{
    root2 = Constant<value = float {{1.4142135623730951}}>()
    one = Constant<value = float {{1.0}}>()
    half = Constant<value = float {{0.5}}>()
    {_like("root2", "x", "r", opset, plain)}
    scaled = Div(x, r)
    e = Erf(scaled)
    {_like("one", "x", "o", opset, plain)}
    cdf = Add(e, o)
    xc = Mul(x, cdf)
    {_like("half", "x", "h", opset, plain)}
    y = Mul(xc, h)
}}"""


def _gelu_tanh(opset: int, plain: bool) -> str:
    return f"""
GeluTanh (x) => (y) {{
    k = Constant<value = float {{0.044715}}>()
    c = Constant<value = float {{0.7978845608028654}}>()
    one = Constant<value = float {{1.0}}>()
    half = Constant<value = float {{0.5}}>()
    three = Constant<value = float {{3.0}}>()
    {_like("three", "x", "t3", opset, plain)}
    x3 = Pow(x, t3)
    {_like("k", "x", "kk", opset, plain)}
    kx3 = Mul(x3, kk)
    inner = Add(x, kx3)
    {_like("c", "x", "cc", opset, plain)}
    arg = Mul(inner, cc)
    t = Tanh(arg)
    {_like("one", "x", "o", opset, plain)}
    cdf = Add(t, o)
    {_like("half", "x", "hh", opset, plain)}
    hx = Mul(x, hh)
    y = Mul(hx, cdf)
}}"""


def _silu(opset: int, plain: bool) -> str:
    return """
SiLU (x) => (y) {
    s = Sigmoid(x)
    y = Mul(x, s)
}"""


# Canonical attention (issue 4): one op for every exported form of scaled-dot-product
# attention. Inputs are Q [.., S, D], KT = K^T [.., D, T] (K transposed, as every exporter
# feeds the scores MatMul: rank-generic, and a lowering composes the transpose it needs),
# V [.., T, Dv] and, for MaskedAttention, an additive bias broadcastable to [.., S, T]
# (boolean masks become Where(mask, 0, fill) outside the op). Grouped-query K/V arrive
# already repeated to the query heads; `kv_num_heads` records the count before the repeat.
# Attributes other than `scale` describe the layer for lowerings and mixers:
# q_num_heads, kv_num_heads, head_size (0 = unknown), causal (1 = the bias hides future
# keys), rope (1 = Q and K are rotated before the op), mask ("none", "additive", "boolean").
ATTENTION = "Attention"
MASKED_ATTENTION = "MaskedAttention"
ATTENTION_OPS = (ATTENTION, MASKED_ATTENTION)
ATTENTION_ATTRIBUTES = ("scale", "q_num_heads", "kv_num_heads", "head_size", "causal", "rope", "mask")


def _attention(masked: bool) -> Callable[[int, bool], str]:
    def body(opset: int, plain: bool) -> str:
        name, bias = (MASKED_ATTENTION, ", bias") if masked else (ATTENTION, "")
        scores = "biased = Add(scores, bias)" if masked else "biased = Identity(scores)"
        return f"""
{name} <{", ".join(ATTENTION_ATTRIBUTES)}> (Q, KT, V{bias}) => (Y) {{
    s = Constant<value_float: float = @scale>()
    {_like("s", "Q", "sc", opset, plain)}
    qk = MatMul(Q, KT)
    scores = Mul(qk, sc)
    {scores}
    p = Softmax<axis = -1>(biased)
    Y = MatMul(p, V)
}}"""

    return body


@dataclasses.dataclass(frozen=True)
class FunctionDef:
    name: str
    body: Callable[[int, bool], str]  # (default-domain opset, float32-only body) -> function text


def _mixers() -> list[FunctionDef]:
    """Token mixers (issue 6): float32 bodies written for opset 18 (graphopt/mixer_bodies.py),
    models of opset 13-17 get ReduceMax's axes as an attribute."""
    from graphopt import banded_bodies as bb, mixer_bodies as mb

    defs = _mixer_defs(bb, mb)
    return [FunctionDef(d.name, lambda opset, plain, body=d.body: _reduce_max_for(opset, body(opset, plain))) for d in defs]


def _reduce_max_for(opset: int, text: str) -> str:
    """ReduceMax took its axes as an attribute before opset 18 (the bodies reduce the last axis)."""
    if opset >= 18:
        return text
    return re.sub(r"ReduceMax<keepdims = 1>\((\w+), \w+\)", r"ReduceMax<keepdims = 1, axes = [-1]>(\1)", text)


def _mixer_defs(bb, mb) -> list[FunctionDef]:
    defs = [FunctionDef("PoolMixer", lambda opset, plain: mb.pool_body()),
            FunctionDef("CausalPoolMixer", lambda opset, plain: mb.pool_body(causal=True)),
            FunctionDef("WindowAttention", lambda opset, plain: mb.window_body()),
            FunctionDef("HybridAttention", lambda opset, plain: mb.hybrid_body()),
            FunctionDef("TokenConv", lambda opset, plain: mb.token_conv_body(causal=False)),

            FunctionDef("CausalTokenConv", lambda opset, plain: mb.token_conv_body(causal=True))]
    for causal in (False, True):
        defs.append(FunctionDef(bb.window_name(causal), lambda opset, plain, c=causal: bb.window_body(c)))
        defs.append(FunctionDef(bb.hybrid_name(causal), lambda opset, plain, c=causal: bb.hybrid_body(c)))
    for kind in mb.MAPS:
        defs.append(FunctionDef(mb.recurrent_name(kind), lambda opset, plain, k=kind: mb.recurrent_body(k)))
        for causal in (False, True):
            for quadratic in (False, True):
                defs.append(FunctionDef(mb.linear_name(kind, causal, quadratic),
                                        lambda opset, plain, k=kind, c=causal, q=quadratic: mb.linear_body(k, c, q)))
        defs.append(FunctionDef(mb.linear_name(kind, True, False, past=True),
                                lambda opset, plain, k=kind: mb.linear_body(k, True, False, past=True)))
    return defs


LIBRARY: dict[str, FunctionDef] = {
    f.name: f
    for f in (
        *_mixers(),
        FunctionDef("RMSNormalization", _rms_norm),
        FunctionDef("LayerNormalization", _layer_norm),
        FunctionDef("Gelu", _gelu),
        FunctionDef("GeluTanh", _gelu_tanh),
        FunctionDef("SiLU", _silu),
        FunctionDef(ATTENTION, _attention(masked=False)),
        FunctionDef(MASKED_ATTENTION, _attention(masked=True)),
    )
}


def op_id(name: str) -> ops.OpId:
    return ops.OpId(DOMAIN, name)


def build(name: str, opset: int, plain: bool = False) -> ir.Function:
    text = f'<domain: "{DOMAIN}", opset_import: ["" : {opset}]>\n{LIBRARY[name].body(opset, plain)}'
    return ir.serde.deserialize_function(onnx.parser.parse_function(text))


def ensure(model: ir.Model) -> list[str]:
    """Add the definitions of every graphopt function the graph calls but lacks."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 18))
    calls: dict[str, list[ir.Node]] = {}
    for n in ir.traversal.RecursiveGraphIterator(model.graph):
        if n.domain == DOMAIN:
            calls.setdefault(n.op_type, []).append(n)
    added = []
    for name, nodes in sorted(calls.items()):
        if name in LIBRARY and (DOMAIN, name, "") not in model.functions:
            plain = all(n.inputs[0] is not None and n.inputs[0].dtype == ir.DataType.FLOAT for n in nodes)
            fn = build(name, opset, plain)
            model.functions[fn.identifier()] = fn
            added.append(name)
    if calls:
        model.opset_imports.setdefault(DOMAIN, VERSION)
    return added
