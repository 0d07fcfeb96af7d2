"""The window + linear hybrid: softmax over a sliding window (plus sinks) and Hedgehog linear
attention over every visible key, mixed by a fitted per-head factor gamma [1, H, 1, 1]:

    y = (sum_win e^(s - m) v + gamma e^-m sum_all a v) / (sum_win e^(s - m) + gamma e^-m sum_all a)

with s = scale q.k + bias, m the window's row max, a = phi(q).phi(k). gamma = 0 is window
attention; gamma -> infinity is linear attention: the hybrid holds both of its parts, and the
fit starts each head from the better of the two on the calibration data, then fits W and gamma
together, held-out data choosing the stopping point (and the parts themselves, when no fitted
point beats them). The window holds HYBRID_COVERAGE of the attention mass on the calibration
data, at most HYBRID_MAX_SPAN of the typical sequence. `HybridAttention` scores every key;
`HybridAttentionBanded[Causal]` scores only the band: the softmax needs only the band's row max
for stability, and sum_all is the linear-attention total (non-causal: phi(K)^T V over every key;
causal: its running sum over the same blocks).
"""

from __future__ import annotations

import numpy as np

from graphopt.functions import define
from graphopt.passes.attention.masks import HIDDEN
from graphopt.passes.mixers import _band, spec as specs, transfer, window as window_kind
from graphopt.passes.mixers.linear import feature_map, reference_feature_map
from graphopt.passes.mixers.transfer import EPS

HYBRID_COVERAGE = 0.5  # the softmax window holds half the attention mass
HYBRID_MAX_SPAN = 0.25  # ...and covers at most a quarter of the median real sequence (2w + 1 keys; causal w + 1)
SATURATE = 6.0  # log-odds of the mass share that makes a head (nearly) one part: 99.75%
CHECK_EVERY = 25  # fitting steps between held-out checks
INPUTS = ("Q", "KT", "V", "bias", "W", "gamma")
# causal: the linear part keeps one [F, Dv] running sum per query block, so blocks of a small
# window's half (7 queries at window 13) spend more on those sums than the band saves; blocks of
# at least 16 ran a 2048-token layer at window 13 in 7.1 ms instead of 8.9 (19: 7.1, 7.8)
CAUSAL_MIN_BLOCK = 16


def banded_name(causal: bool) -> str:
    return f"HybridAttentionBanded{'Causal' if causal else ''}"


def _mix(op, c, m, gamma, num_w, den_w, num_all, den_all):
    mix = op.Mul(op.Exp(op.Neg(m)), gamma)
    num = op.Add(num_w, op.Mul(num_all, mix))
    return op.Div(num, op.Add(op.Add(den_w, op.Mul(den_all, mix)), c.f32(EPS)))


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
    a = op.Mul(op.MatMul(pq, op.Transpose(pk, perm=[0, 1, 3, 2])), visible)
    return _mix(op, c, m, gamma, op.MatMul(ew, v), c.reduce("Sum", ew, [-1]), op.MatMul(a, v), c.reduce("Sum", a, [-1]))


def _banded_body(causal: bool):
    def body(op, c, q, kt, v, keymask, w, gamma):
        b = _band.blocks(op, c, q, kt, v, keymask, causal, min_block=CAUSAL_MIN_BLOCK if causal else 1)
        axis2 = c.i64([2])
        root_scale = op.Sqrt(b.scale)
        pq = feature_map(op, c, "Hedgehog", q, w, root_scale)
        pk = op.Mul(feature_map(op, c, "Hedgehog", b.K, w, root_scale), keymask)
        f_dim = op.Shape(pq, start=-1)
        pqb, pkb = b.blocked(pq, b.q_pads, f_dim), b.blocked(pk, b.kv_pads, f_dim)
        # softmax inside the window: the row max over the band (and sinks), for stability only
        row_max = c.reduce("Max", b.masked_band, [-1])
        if causal:
            row_max = op.Max(row_max, c.reduce("Max", b.masked_s, [-1]))
        m = op.Where(op.Greater(row_max, c.f32(HIDDEN)), row_max, c.f32(0.0))
        e_band = op.Exp(op.Sub(b.masked_band, m))
        num_w, den_w = op.MatMul(e_band, b.vband), c.reduce("Sum", e_band, [-1])
        if causal:  # the sinks are in the softmax too
            e_s = op.Exp(op.Sub(b.masked_s, m))
            num_w, den_w = op.Add(num_w, op.MatMul(e_s, b.vs5)), op.Add(den_w, c.reduce("Sum", e_s, [-1]))
        if causal:  # running sums over the query blocks: earlier blocks (exclusive CumSum) + this block (masked)
            pk_cur, v_cur = b.current(pkb), b.current(b.vb)
            swap = [0, 1, 2, 4, 3]  # each transpose has one reader, so onnxruntime folds it into that MatMul
            kv_before = op.CumSum(op.MatMul(op.Transpose(pk_cur, perm=swap), v_cur), c.i64(2), exclusive=1)
            z_before = op.CumSum(c.reduce("Sum", pk_cur, [-2]), c.i64(2), exclusive=1)  # [.., 1, F]
            a_self = op.Trilu(op.MatMul(pqb, op.Transpose(pk_cur, perm=swap)), upper=0)
            num_all = op.Add(op.MatMul(pqb, kv_before), op.MatMul(a_self, v_cur))
            den_all = op.Add(op.MatMul(pqb, op.Transpose(z_before, perm=swap)), c.reduce("Sum", a_self, [-1]))
        else:
            pk_t = op.Transpose(pk, perm=[0, 1, 3, 2])
            num_all = op.MatMul(pqb, op.Unsqueeze(op.MatMul(pk_t, v), axis2))
            den_all = op.MatMul(pqb, op.Unsqueeze(c.reduce("Sum", pk_t, [-1]), axis2))
        out = _mix(op, c, m, op.Unsqueeze(gamma, axis2), num_w, den_w, num_all, den_all)
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
    a = (pq @ pk.transpose(-1, -2)) * (bias > HIDDEN).float()
    mix = torch.exp(-m) * gamma
    return (e @ v + mix * (a @ v)) / (e.sum(-1, keepdim=True) + mix * a.sum(-1, keepdim=True) + EPS)


def _head_errors(out, y, mask):
    """Per head: the summed squared error and the summed square of y, on real queries."""
    other = (0, 2, 3)
    return (((out - y) ** 2) * mask).sum(other), ((y ** 2) * mask).sum(other)


def _log_mass_ratio(batches, scale: float, window: int, sinks: int, w) -> object:
    """[1, H, 1, 1]: per head, the mean over real queries of log(sum_win e^s / sum_all a): the
    log gamma at which the two parts carry equal mass."""
    import torch

    num = torch.zeros(1)
    count = torch.zeros(1)
    with torch.no_grad():
        for q, kt, v, b, _y in batches:
            bias = torch.zeros(1, 1, 1, 1) if b is None else b
            scores = (q @ kt) * scale + bias
            in_window = window_kind.band_mask(q.shape[-2], kt.shape[-1], window, sinks)
            log_w = torch.logsumexp(torch.where(in_window, scores, torch.finfo(torch.float32).min), -1)
            pq = reference_feature_map("Hedgehog", q, scale, w)
            pk = reference_feature_map("Hedgehog", kt.transpose(-1, -2), scale, w)
            log_a = torch.log(((pq @ pk.transpose(-1, -2)) * (bias > HIDDEN).float()).sum(-1) + 1e-30)
            mask = transfer.query_mask(b, kt.shape[-1], q.shape[-2])
            mask = (mask[..., 0] if torch.is_tensor(mask) else torch.ones(1)).expand_as(log_w)
            num = num + ((log_w - log_a) * mask).sum((0, 2))
            count = count + mask.sum((0, 2))
    return (num / count.clamp(min=1)).reshape(1, -1, 1, 1)


def fit_hybrid(cap, held, node, window: int, steps: int, seed: int, features: int = 1, layer: int = 0) -> dict:
    """The hybrid's W and per-head gamma. The linear part's maps are fitted first (Hedgehog
    attention transfer); each head then starts as (nearly) the better part on the fit data,
    gamma = ratio * e^(+-SATURATE); W and log gamma are fitted together with the held-out error
    checked every CHECK_EVERY steps. The best held-out point wins, against the two parts
    themselves too (gamma = 0: the window part; the linear part), so on held-out data the
    hybrid is never worse than either."""
    import torch

    from graphopt.passes.mixers.linear import fit_hedgehog

    scale, sinks = specs.scale_of(node), specs.sinks_for(node)
    start = specs.per_head_identity(node, "the hybrid mixer", features, specs.layer_seed(seed, layer))
    w_lin = fit_hedgehog(cap, node, start, steps, seed)
    data, checks = transfer.batches(cap), transfer.batches(held)
    ratio = _log_mass_ratio(data, scale, window, sinks, torch.as_tensor(w_lin))

    def errors(w, log_gamma, batches, gamma=None):
        num = den = 0.0
        for q, kt, v, b, y in batches:
            g = log_gamma.exp() if gamma is None else gamma
            out = hybrid_attention(q, kt, v, b, scale, window, sinks, w, g)
            n, d = _head_errors(out, y, transfer.query_mask(b, kt.shape[-1], q.shape[-2]))
            num, den = num + n, den + d
        return num, den

    with torch.no_grad():
        w0 = torch.as_tensor(w_lin)
        win_n, den = errors(w0, ratio, data, gamma=torch.zeros_like(ratio))
        lin_n, _ = errors(w0, ratio + SATURATE, data)
    start_linear = (lin_n < win_n).reshape(1, -1, 1, 1)
    w = torch.nn.Parameter(w0.clone())
    log_gamma = torch.nn.Parameter(torch.where(start_linear, ratio + SATURATE, ratio - SATURATE))

    def loss(batch):
        q, kt, v, b, y = batch
        out = hybrid_attention(q, kt, v, b, scale, window, sinks, w, log_gamma.exp())
        return transfer.relative_error(out, y, transfer.query_mask(b, kt.shape[-1], q.shape[-2]))

    def held_error(w_, log_gamma_=None, gamma=None):
        n, d = errors(w_, log_gamma_, checks, gamma)
        return float(n.sum() / d.sum().clamp(min=1e-30))

    fitted = transfer.fit([{"params": [w]}, {"params": [log_gamma], "lr": 0.1}], loss, data, steps, seed,
                          check=lambda: held_error(w, log_gamma), every=CHECK_EVERY)
    with torch.no_grad():
        parts = {"fitted": fitted,
                 "window part": held_error(w0, gamma=torch.zeros_like(ratio)),
                 "linear part": held_error(w0, ratio + 2 * SATURATE)}
    chosen = min(parts, key=parts.get)
    if chosen == "fitted":
        gamma, weights = log_gamma.exp(), w
    elif chosen == "window part":
        gamma, weights = torch.zeros_like(ratio), w0
    else:
        gamma, weights = (ratio + 2 * SATURATE).exp(), w0
    return {"W": transfer.array(weights), "gamma": transfer.array(gamma), "window": window,
            "start": ["linear" if s else "window" for s in start_linear.ravel().tolist()], "chosen": chosen,
            "held_rel_errors": {k: round(v ** 0.5, 6) for k, v in parts.items()}}


def max_window(cap, node) -> int:
    """The largest window whose band covers at most HYBRID_MAX_SPAN of the median real length."""
    lengths = []
    for q, kt, b in zip(cap["q"], cap["kt"], cap["bias"]):
        t = kt.shape[-1]
        if b is None:
            lengths += [t] * q.shape[0]
        else:
            lengths += (np.asarray(b)[:, 0, -1, :] > HIDDEN).sum(-1).tolist() * (q.shape[0] // b.shape[0])
    span = int(HYBRID_MAX_SPAN * float(np.median(lengths)))
    return max(0, span - 1) if specs.is_causal(node) else max(0, (span - 1) // 2)


class Hybrid(specs.MixerKind):
    kind = "hybrid"
    names = ("hybrid",)

    def report_fields(self, spec):
        return {"features": spec.features}  # its Hedgehog branch's width

    def fit(self, spec, node, layer, fit, held, steps, seed):
        window = spec.cap(min(window_kind.choose_window(fit, node, HYBRID_COVERAGE), max_window(fit, node)))
        w = fit_hybrid(fit, held, node, window, steps, seed, spec.features, layer)
        return w | {"mask_only": window_kind.mask_only(fit) and window_kind.mask_only(held)}

    def fitted(self, spec):
        return True

    def output(self, spec, node, q, kt, v, bias, w):
        import torch

        return hybrid_attention(q, kt, v, None if bias is None else torch.as_tensor(bias), specs.scale_of(node),
                                int(w["window"]), specs.sinks_for(node), torch.as_tensor(w["W"]),
                                torch.as_tensor(w["gamma"]))

    def describe(self, spec, node, w):
        return {"window": int(w["window"]), "gamma": [float(f"{float(g):.4g}") for g in np.asarray(w["gamma"]).ravel()],
                "start": w.get("start"), "chosen": w.get("chosen"), "held_rel_errors": w.get("held_rel_errors")}

    def swap(self, model, node, spec, w, *, quadratic, layer):
        def params(b):
            return [b.constant(w["W"], f"hybrid_w_{node.name}"), b.constant(w["gamma"], f"hybrid_gamma_{node.name}")]

        return window_kind.swap_band(model, node, "hybrid", "HybridAttention", banded_name(specs.is_causal(node)), w,
                                     params)


specs.register(Hybrid())
