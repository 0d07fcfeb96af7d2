"""Linear attention: its ONNX bodies, its torch reference, its fit and its graph edit.

    Y = phi(Q) (phi(K)^T V) / (phi(Q) sum_t phi(K_t) + eps)

Feature maps (phi, per token):
    elu        elu(x) + 1
    relu       relu(x)                                   (SLAB's simplified linear attention)
    hedgehog   softmax([x W, -x W]) over features, W per head [H, D, D]  (fitted; x = sqrt(scale) x)
    performer  exp(x w - |x|^2 / 2) / sqrt(m), w [D, m] Gaussian      (FAVOR+; x = sqrt(scale) x)
Function names say the feature map, causality and evaluation order:
    LinearAttention{Elu,Relu,Hedgehog,Performer}[Causal][Quadratic|Past]
`Quadratic` evaluates (phi(Q) phi(K)^T) V (masked lower-triangular when causal): cheaper for
short sequences, and the causal reference. The causal linear form is chunked (chunk CHUNK, or
S when shorter): a masked matmul inside each chunk plus the running state
sum_{j<i} phi(K_j)^T V_j across chunks (CumSum), so memory and time are linear in T. `Past`:
keys before the last S (a KV cache's past, T > S) enter as the initial state.
`LinearAttention{Map}Recurrent` is the decoding form: the state of every earlier token is an
input and an output (fixed size, replacing a KV cache; passes/mixers/state.py).
Inputs, as the canonical op's: Q [B, H, S, D], KT = K^T [B, H, D, T], V [B, H, T, Dv], plus a
key mask [B|1, 1, T, 1] (1 = a real key) and the feature map's weights W.
"""

from __future__ import annotations

import math

import numpy as np

from graphopt.errors import InputError
from graphopt.functions import define
from graphopt.ir import ir
from graphopt.passes.mixers import dwc, edit, spec as specs, state, transfer
from graphopt.passes.mixers.transfer import EPS

CHUNK = 64
MAPS = ("Elu", "Relu", "Hedgehog", "Performer")
INT64_MAX = np.iinfo(np.int64).max


def linear_name(feature_map: str, causal: bool, quadratic: bool, past: bool = False) -> str:
    """`past`: the chunked causal form for T > S (keys before the queries enter as its initial
    state); the plain chunked form needs S == T and skips that slicing."""
    suffix = "Quadratic" if quadratic else "Past" if causal and past else ""
    return f"LinearAttention{feature_map.capitalize()}{'Causal' if causal else ''}{suffix}"


def recurrent_name(feature_map: str) -> str:
    return f"LinearAttention{feature_map.capitalize()}Recurrent"


# ---- ONNX bodies ----------------------------------------------------------------------

def feature_map(op, c, kind: str, x, w=None, root_scale=None):
    """phi(x) [.., N, D] -> [.., N, F]; `root_scale` = sqrt(scale) for the maps that scale x."""
    if kind == "Elu":
        return op.Add(op.Elu(x), c.f32(1.0))
    if kind == "Relu":
        return op.Relu(x)
    xs = op.Mul(x, root_scale)
    if kind == "Hedgehog":
        xw = op.MatMul(xs, w)
        return op.Softmax(op.Concat(xw, op.Neg(xw), axis=-1), axis=-1)
    if kind == "Performer":  # 1 / sqrt(m), m = W's last dim
        m = op.Cast(op.Slice(op.Shape(w), c.i64([-1]), c.i64([INT64_MAX])), to=1)
        half_norm = op.Mul(c.reduce("Sum", op.Mul(xs, xs), [-1]), c.f32(0.5))
        return op.Mul(op.Exp(op.Sub(op.MatMul(xs, w), half_norm)), op.Reciprocal(op.Sqrt(m)))
    raise ValueError(kind)


def _features(op, c, kind, q, kt, keymask, w):
    """phi(Q) and phi(K) * keymask: what every linear form shares."""
    root_scale = op.Sqrt(c.attr("scale"))
    pq = feature_map(op, c, kind, q, w, root_scale)
    pk = op.Mul(feature_map(op, c, kind, op.Transpose(kt, perm=[0, 1, 3, 2]), w, root_scale), keymask)
    return pq, pk


def _past_state(op, c, pq, pk, v):
    """The keys before the last S summarized as a state s0, z0 (a zero key row is prepended so
    that no past is a sum over one zero row, not over an empty axis); the last S keys and values."""
    axis2 = c.i64([2])
    t_keys, s_queries = op.Shape(pk, start=-2, end=-1), op.Shape(pq, start=-2, end=-1)
    p_len = op.Sub(t_keys, s_queries)
    zero_row = c.i64([0, 0, 1, 0, 0, 0, 0, 0])
    pk_pre = op.Pad(op.Slice(pk, c.i64([0]), p_len, axis2), zero_row)
    v_pre = op.Pad(op.Slice(v, c.i64([0]), p_len, axis2), zero_row)
    pk_pre_t = op.Transpose(pk_pre, perm=[0, 1, 3, 2])
    s0, z0 = op.MatMul(pk_pre_t, v_pre), c.reduce("Sum", pk_pre_t, [-1])
    return op.Slice(pk, p_len, t_keys, axis2), op.Slice(v, p_len, t_keys, axis2), s0, z0


def _chunked(op, c, pq, pk, v, s0=None, z0=None):
    """Causal linear attention over pq/pk/v [B, H, S, .] in chunks of min(CHUNK, S) (so one
    decoding step is one chunk of one token): inside a chunk a masked matmul, across chunks the
    running state (s0 +) sum_{earlier chunks} phi(K)^T V (CumSum), likewise the normalizer (z0 +).
    Returns Y and the per-chunk kv, z (the recurrent form sums them into its new state)."""
    minus1, zero1 = c.i64([-1]), c.i64([0])
    s_len = op.Shape(pk, start=-2, end=-1)
    chunk = op.Min(c.i64([CHUNK]), s_len)
    pad = op.Mod(op.Sub(chunk, op.Mod(s_len, chunk)), chunk)
    pads8 = op.Concat(c.i64([0, 0]), zero1, zero1, c.i64([0, 0]), pad, zero1, axis=0)
    lead, f_dim, dv_dim = op.Shape(pq, end=2), op.Shape(pq, start=-1), op.Shape(v, start=-1)
    shape_f = op.Concat(lead, minus1, chunk, f_dim, axis=0)
    q5 = op.Reshape(op.Pad(pq, pads8), shape_f)
    k5 = op.Reshape(op.Pad(pk, pads8), shape_f)
    v5 = op.Reshape(op.Pad(v, pads8), op.Concat(lead, minus1, chunk, dv_dim, axis=0))
    k5t = op.Transpose(k5, perm=[0, 1, 2, 4, 3])
    kv = op.MatMul(k5t, v5)
    axis2 = c.i64(2)
    state_run = op.CumSum(kv, axis2, exclusive=1)
    if s0 is not None:
        state_run = op.Add(state_run, op.Unsqueeze(s0, c.i64([2])))
    inter = op.MatMul(q5, state_run)
    a = op.Trilu(op.MatMul(q5, k5t), upper=0)
    intra = op.MatMul(a, v5)
    z = c.reduce("Sum", k5t, [-1])
    zs = op.CumSum(z, axis2, exclusive=1)
    if z0 is not None:
        zs = op.Add(zs, op.Unsqueeze(z0, c.i64([2])))
    den = op.Add(op.Add(op.MatMul(q5, zs), c.reduce("Sum", a, [-1])), c.f32(EPS))
    y5 = op.Div(op.Add(inter, intra), den)
    yp = op.Reshape(y5, op.Concat(lead, minus1, dv_dim, axis=0))
    return op.Slice(yp, zero1, s_len, c.i64([2])), kv, z


def _linear_body(kind: str, causal: bool, quadratic: bool, past: bool):
    def body(op, c, q, kt, v, keymask, w=None):
        pq, pk = _features(op, c, kind, q, kt, keymask, w)
        if causal and not quadratic:  # chunked, linear time
            if past:
                pk, v, s0, z0 = _past_state(op, c, pq, pk, v)
                return _chunked(op, c, pq, pk, v, s0, z0)[0]
            return _chunked(op, c, pq, pk, v)[0]
        pkt = op.Transpose(pk, perm=[0, 1, 3, 2])
        eps = c.f32(EPS)
        if not quadratic:  # phi(Q) (phi(K)^T V)
            num = op.MatMul(pq, op.MatMul(pkt, v))
            return op.Div(num, op.Add(op.MatMul(pq, c.reduce("Sum", pkt, [-1])), eps))
        a = op.MatMul(pq, pkt)  # (phi(Q) phi(K)^T) V
        if causal:  # keys up to the query's position among the keys (T - S past keys first)
            offset = op.Sub(op.Shape(a, start=-1), op.Shape(a, start=-2, end=-1))
            a = op.Trilu(a, op.Squeeze(offset), upper=0)
        return op.Div(op.MatMul(a, v), op.Add(c.reduce("Sum", a, [-1]), eps))

    return body


def _recurrent_body(kind: str):
    def body(op, c, q, kt, v, keymask, s0, z0, w=None):
        """Causal linear attention over new tokens with the state of every earlier token carried
        outside the graph: state [B, H, F, Dv] = sum_j phi(k_j)^T v_j, normalizer [B, H, F, 1] =
        sum_j phi(k_j)^T; KT and V hold the new tokens only (one when decoding, many when
        prefilling). Outputs the states after the new tokens: run token by token it equals the
        causal forms (tested)."""
        pq, pk = _features(op, c, kind, q, kt, keymask, w)
        y, kv, z = _chunked(op, c, pq, pk, v, s0, z0)
        return y, op.Add(s0, c.reduce("Sum", kv, [2], keepdims=0)), op.Add(z0, c.reduce("Sum", z, [2], keepdims=0))

    return body


def _register_bodies() -> None:
    for kind in MAPS:
        weights = ("W",) if kind in ("Hedgehog", "Performer") else ()
        forms = [(False, False, False), (False, True, False), (True, False, False), (True, True, False),
                 (True, False, True)]
        for causal, quadratic, past in forms:
            define(linear_name(kind, causal, quadratic, past), ("Q", "KT", "V", "keymask", *weights),
                   attributes=[("scale", ir.AttributeType.FLOAT)])(_linear_body(kind, causal, quadratic, past))
        define(recurrent_name(kind), ("Q", "KT", "V", "keymask", "state", "normalizer", *weights),
               outputs=("Y", "state_out", "normalizer_out"),
               attributes=[("scale", ir.AttributeType.FLOAT)])(_recurrent_body(kind))


_register_bodies()


# ---- torch reference (the fitting objective and what the bodies are tested against) -------

def reference_feature_map(kind: str, x, scale: float, w=None):
    import torch

    kind = kind.capitalize()
    if kind == "Elu":
        return torch.nn.functional.elu(x) + 1
    if kind == "Relu":
        return torch.relu(x)
    xs = x * math.sqrt(scale)
    if kind == "Hedgehog":
        xw = xs @ w
        return torch.softmax(torch.cat([xw, -xw], dim=-1), dim=-1)
    if kind == "Performer":
        projected = xs @ w
        return torch.exp(projected - (xs * xs).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[-1])
    raise ValueError(f"unknown feature map {kind}")


def linear_attention(kind: str, q, kt, v, keymask, scale: float, w=None, causal: bool = False):
    pq = reference_feature_map(kind, q, scale, w)
    pk = reference_feature_map(kind, kt.transpose(-1, -2), scale, w) * keymask
    if not causal:
        num = pq @ (pk.transpose(-1, -2) @ v)
        den = pq @ pk.sum(-2, keepdim=True).transpose(-1, -2)
    else:
        a = (pq @ pk.transpose(-1, -2)).tril(kt.shape[-1] - q.shape[-2])
        num, den = a @ v, a.sum(-1, keepdim=True)
    return num / (den + EPS)


def linear_state(kind: str, kt, v, keymask, scale: float, w=None):
    """The recurrent state of these keys and values: (sum_j phi(k_j)^T v_j [B,H,F,Dv],
    sum_j phi(k_j)^T [B,H,F,1]), what LinearAttention*Recurrent carries between calls."""
    pk = reference_feature_map(kind, kt.transpose(-1, -2), scale, w) * keymask
    return pk.transpose(-1, -2) @ v, pk.sum(-2, keepdim=True).transpose(-1, -2)


# ---- the kind: initial weights, fit, graph edit --------------------------------------------

def initial_weights(spec: specs.MixerSpec, node: ir.Node, layer: int, seed: int = 0) -> np.ndarray | None:
    """Hedgehog: identity per head [H, D, D]; Performer: Gaussian features [D, 4 D], seeded per layer."""
    if spec.feature_map == "Hedgehog":
        return specs.per_head_identity(node, "Hedgehog", spec.features, specs.layer_seed(seed, layer))
    if spec.feature_map == "Performer":
        size = node.attributes.get_int("head_size", 0)
        if not size:
            raise InputError(f"attention '{node.name}' has an unknown head size; Performer needs it")
        return np.random.default_rng(specs.layer_seed(seed, layer)).standard_normal((size, 4 * size)).astype(np.float32)
    return None


def fit_hedgehog(cap, node, w0: np.ndarray, steps: int, seed: int) -> np.ndarray:
    """Attention transfer: W minimizing the mean squared error to the captured softmax output."""
    import torch

    w = torch.nn.Parameter(torch.as_tensor(w0).clone())
    scale, causal = specs.scale_of(node), specs.is_causal(node)

    def loss(batch):
        q, kt, v, b, y = batch
        out = linear_attention("Hedgehog", q, kt, v, transfer.keymask(b), scale, w, causal)
        return transfer.relative_error(out, y, transfer.query_mask(b, kt.shape[-1], q.shape[-2]))

    transfer.fit([w], loss, transfer.batches(cap), steps, seed)
    return transfer.array(w)


class Linear(specs.MixerKind):
    kind = "linear"
    names = ("linear:elu", "linear:relu", "linear:relu+dwc", "linear:hedgehog", "linear:performer")

    def report_fields(self, spec):
        return {"features": spec.features} if spec.feature_map == "Hedgehog" else {}

    def fit(self, spec, node, layer, fit, held, steps, seed):
        if spec.dwc:
            scale, causal = specs.scale_of(node), specs.is_causal(node)

            def base(q, kt, v, keys):
                return linear_attention(spec.feature_map, q, kt, v, keys, scale, None, causal)

            return dwc.fit_token_conv(base, fit, node, dwc.initial_conv(node), steps, seed)
        w = initial_weights(spec, node, layer, seed)
        return fit_hedgehog(fit, node, w, steps, seed) if spec.feature_map == "Hedgehog" else w

    def fitted(self, spec):
        return spec.feature_map == "Hedgehog" or spec.dwc

    def output(self, spec, node, q, kt, v, bias, w):
        import torch

        scale, causal, keys = specs.scale_of(node), specs.is_causal(node), transfer.keymask(bias)
        if spec.dwc:
            return (linear_attention(spec.feature_map, q, kt, v, keys, scale, None, causal)
                    + dwc.token_conv(q, v, keys, torch.as_tensor(w), causal))
        return linear_attention(spec.feature_map, q, kt, v, keys, scale, None if w is None else torch.as_tensor(w), causal)

    def swap(self, model, node, spec, w, *, quadratic, layer):
        b = edit.Builder(model, node)
        q, kt, v = node.inputs[:3]
        causal = specs.is_causal(node)
        caches = state.find_caches(node) if causal else None
        kept = state.why_not(node, caches) if caches is not None else None
        if caches is not None and spec.dwc:
            kept = "the depthwise-conv branch needs the last values, which the state does not carry"
        keymask = edit.keymask(b)
        params = [b.constant(w, f"{spec.feature_map.lower()}_{node.name}")] if spec.has_weights else []
        if caches is not None and kept is None:
            return state.swap_recurrent(b, spec, caches, keymask, params, recurrent_name(spec.feature_map), layer)
        name = linear_name(spec.feature_map, causal, quadratic, past=not edit.same_length(q, kt))
        y = b.call(name, [q, kt, v, keymask, *params], suffix="linear", **edit.scale_attr(node))
        done = name + (f" (keeps its KV cache: {kept})" if kept else "")
        if spec.dwc:
            y, conv = dwc.add_token_conv(b, y, keymask, w, causal)
            done += " + " + conv
        b.install(y)
        return done


def quadratic(spec: specs.MixerSpec, node: ir.Node, seq: int) -> bool:
    """Evaluation order by cost: Q (K^T V) costs ~ 2 T F Dv, (Q K^T) V ~ T^2 (F + Dv) per head."""
    if spec.kind != "linear":
        return False
    d = node.attributes.get_int("head_size", 0) or 64
    f = 2 * d * spec.features if spec.feature_map == "Hedgehog" else 4 * d if spec.feature_map == "Performer" else d
    return seq * (f + d) < 2 * f * d


specs.register(Linear())
