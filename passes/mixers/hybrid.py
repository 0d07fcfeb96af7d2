"""The window + linear hybrid: softmax over a sliding window (plus sinks), Hedgehog linear
attention over every other visible key, mixed by a fitted per-head factor gamma [1, H, 1, 1]:

    y = (sum_win e^(s - m) v + gamma e^-m sum_rest a v) / (sum_win e^(s - m) + gamma e^-m sum_rest a)

with s = scale q.k + bias, m the row max, a = phi(q).phi(k). The window holds HYBRID_COVERAGE of
the attention mass on the calibration data; W and gamma are fitted together by attention
transfer. `HybridAttention` scores every key; `HybridAttentionBanded[Causal]` scores only the
band: the softmax needs only the window's row max for stability, and
sum_rest = sum_visible - sum_band - sum_sinks, where sum_visible is the linear-attention total
(non-causal: phi(K)^T V over every key; causal: its running sum over the same blocks).
"""

from __future__ import annotations

import numpy as np

from graphopt.functions import define
from graphopt.passes.attention.masks import HIDDEN
from graphopt.passes.mixers import _band, spec as specs, transfer, window as window_kind
from graphopt.passes.mixers.linear import feature_map, reference_feature_map
from graphopt.passes.mixers.transfer import EPS

HYBRID_COVERAGE = 0.5  # the softmax window holds half the attention mass; linear attention the rest
INPUTS = ("Q", "KT", "V", "bias", "W", "gamma")


def banded_name(causal: bool) -> str:
    return f"HybridAttentionBanded{'Causal' if causal else ''}"


def _mix(op, c, m, gamma, num_w, den_w, num_rest, den_rest):
    mix = op.Mul(op.Exp(op.Neg(m)), gamma)
    num = op.Add(num_w, op.Mul(num_rest, mix))
    return op.Div(num, op.Add(op.Add(den_w, op.Mul(den_rest, mix)), c.f32(EPS)))


@define("HybridAttention", INPUTS, attributes=window_kind.BAND_ATTRIBUTES)
def hybrid_attention_body(op, c, q, kt, v, bias, w, gamma):
    """Reference body: every score is computed (the banded bodies are what make it cheaper)."""
    scale = c.attr("scale")
    in_window = op.Cast(_band.full_band(op, c, q, kt), to=1)
    scores = op.Add(op.Mul(op.MatMul(q, kt), scale), bias)
    visible = op.Cast(op.Greater(bias, c.f32(HIDDEN)), to=1)
    m = c.reduce("Max", scores, [-1])
    ew = op.Mul(op.Exp(op.Sub(scores, m)), in_window)
    root_scale = op.Sqrt(scale)
    pq = feature_map(op, c, "Hedgehog", q, w, root_scale)
    pk = feature_map(op, c, "Hedgehog", op.Transpose(kt, perm=[0, 1, 3, 2]), w, root_scale)
    a = op.Mul(op.Mul(op.MatMul(pq, op.Transpose(pk, perm=[0, 1, 3, 2])), op.Sub(c.f32(1.0), in_window)), visible)
    return _mix(op, c, m, gamma, op.MatMul(ew, v), c.reduce("Sum", ew, [-1]), op.MatMul(a, v), c.reduce("Sum", a, [-1]))


def _banded_body(causal: bool):
    def body(op, c, q, kt, v, keymask, w, gamma):
        b = _band.blocks(op, c, q, kt, v, keymask, causal)
        axis2 = c.i64([2])
        root_scale = op.Sqrt(b.scale)
        pq = feature_map(op, c, "Hedgehog", q, w, root_scale)
        pk = op.Mul(feature_map(op, c, "Hedgehog", b.K, w, root_scale), keymask)
        f_dim = op.Shape(pq, start=-1)
        pqb, pkb = b.blocked(pq, b.q_pads, f_dim), b.blocked(pk, b.kv_pads, f_dim)
        # softmax inside the window: the row max over the band (and sinks), for stability only
        row = op.Concat(b.masked_band, b.masked_s, axis=-1) if causal else b.masked_band
        row_max = c.reduce("Max", row, [-1])
        m = op.Where(op.Greater(row_max, c.f32(HIDDEN)), row_max, c.f32(0.0))
        e_band = op.Exp(op.Sub(b.masked_band, m))
        num_w, den_w = op.MatMul(e_band, b.vband), c.reduce("Sum", e_band, [-1])
        a_band = op.Mul(op.MatMul(pqb, op.Transpose(b.band(pkb), perm=[0, 1, 2, 4, 3])), op.Cast(b.allowed, to=1))
        num_near, den_near = op.MatMul(a_band, b.vband), c.reduce("Sum", a_band, [-1])
        if causal:  # the sinks: in the softmax, and out of the linear rest
            e_s = op.Exp(op.Sub(b.masked_s, m))
            num_w, den_w = op.Add(num_w, op.MatMul(e_s, b.vs5)), op.Add(den_w, c.reduce("Sum", e_s, [-1]))
            pks = op.Slice(pk, c.i64([0]), b.sinks_1d, axis2)
            a_s = op.Mul(op.MatMul(pqb, op.Unsqueeze(op.Transpose(pks, perm=[0, 1, 3, 2]), axis2)),
                         op.Cast(b.sink_ok, to=1))
            num_near = op.Add(num_near, op.MatMul(a_s, b.vs5))
            den_near = op.Add(den_near, c.reduce("Sum", a_s, [-1]))
        if causal:  # running sums over the query blocks: earlier blocks (exclusive CumSum) + this block (masked)
            lo, hi = c.i64([1]), b.bounds[1][1]
            pk_cur_t = op.Transpose(op.Slice(pkb, lo, hi, axis2), perm=[0, 1, 2, 4, 3])
            v_cur = op.Slice(b.vb, lo, hi, axis2)
            kv_before = op.CumSum(op.MatMul(pk_cur_t, v_cur), c.i64(2), exclusive=1)
            z_before = op.CumSum(c.reduce("Sum", pk_cur_t, [-1]), c.i64(2), exclusive=1)
            a_self = op.Trilu(op.MatMul(pqb, pk_cur_t), upper=0)
            num_all = op.Add(op.MatMul(pqb, kv_before), op.MatMul(a_self, v_cur))
            den_all = op.Add(op.MatMul(pqb, z_before), c.reduce("Sum", a_self, [-1]))
        else:
            pk_t = op.Transpose(pk, perm=[0, 1, 3, 2])
            num_all = op.MatMul(pqb, op.Unsqueeze(op.MatMul(pk_t, v), axis2))
            den_all = op.MatMul(pqb, op.Unsqueeze(c.reduce("Sum", pk_t, [-1]), axis2))
        out = _mix(op, c, m, op.Unsqueeze(gamma, axis2), num_w, den_w, op.Sub(num_all, num_near),
                   op.Sub(den_all, den_near))
        return b.unblock(out)

    return body


for _causal in (False, True):
    define(banded_name(_causal), ("Q", "KT", "V", "keymask", "W", "gamma"),
           attributes=window_kind.BAND_ATTRIBUTES)(_banded_body(_causal))


def hybrid_attention(q, kt, v, bias, scale: float, window: int, sinks: int, w, gamma):
    """The torch reference (and the fitting objective)."""
    import torch

    s_len, t_len = q.shape[-2], kt.shape[-1]
    bias = torch.zeros(1, 1, 1, 1) if bias is None else bias
    scores = (q @ kt) * scale + bias
    in_window = window_kind.band_mask(s_len, t_len, window, sinks).float()
    m = scores.amax(-1, keepdim=True)
    e = torch.exp(scores - m) * in_window
    pq = reference_feature_map("Hedgehog", q, scale, w)
    pk = reference_feature_map("Hedgehog", kt.transpose(-1, -2), scale, w)
    a = (pq @ pk.transpose(-1, -2)) * (1 - in_window) * (bias > HIDDEN).float()
    mix = torch.exp(-m) * gamma
    return (e @ v + mix * (a @ v)) / (e.sum(-1, keepdim=True) + mix * a.sum(-1, keepdim=True) + EPS)


def fit_hybrid(cap, node, window: int, steps: int, seed: int) -> dict:
    """Attention transfer for the hybrid: Hedgehog maps W and the per-head mixing factor gamma."""
    import torch

    heads, size = specs.heads_and_size(node, "the hybrid mixer")
    w = torch.nn.Parameter(torch.eye(size).repeat(heads, 1, 1))
    log_gamma = torch.nn.Parameter(torch.zeros(1, heads, 1, 1))
    scale, sinks = specs.scale_of(node), specs.sinks_for(node)

    def loss(batch):
        q, kt, v, b, y = batch
        return transfer.relative_error(hybrid_attention(q, kt, v, b, scale, window, sinks, w, log_gamma.exp()), y)

    transfer.fit([w, log_gamma], loss, transfer.batches(cap), steps, seed)
    return {"W": transfer.array(w), "gamma": transfer.array(log_gamma.exp()), "window": window}


class Hybrid(specs.MixerKind):
    kind = "hybrid"
    names = ("hybrid",)

    def fit(self, spec, node, layer, fit, held, steps, seed):
        w = fit_hybrid(fit, node, window_kind.choose_window(fit, node, HYBRID_COVERAGE), steps, seed)
        return w | {"mask_only": window_kind.mask_only(fit) and window_kind.mask_only(held)}

    def fitted(self, spec):
        return True

    def output(self, spec, node, q, kt, v, bias, w):
        import torch

        return hybrid_attention(q, kt, v, None if bias is None else torch.as_tensor(bias), specs.scale_of(node),
                                int(w["window"]), specs.sinks_for(node), torch.as_tensor(w["W"]),
                                torch.as_tensor(w["gamma"]))

    def describe(self, spec, node, w):
        return {"window": int(w["window"]), "gamma": [round(float(g), 4) for g in np.asarray(w["gamma"]).ravel()]}

    def swap(self, model, node, spec, w, *, quadratic, layer):
        def params(b):
            return [b.constant(w["W"], f"hybrid_w_{node.name}"), b.constant(w["gamma"], f"hybrid_gamma_{node.name}")]

        return window_kind.swap_band(model, node, "hybrid", "HybridAttention", banded_name(specs.is_causal(node)), w,
                                     params)


specs.register(Hybrid())
