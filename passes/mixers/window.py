"""Sliding-window attention with sink tokens: its ONNX bodies, torch reference, calibration and
graph edit.

Softmax attention where query i sees key j only when |i' - j| <= window (i' = i + T - S, the
query's position among the keys) or j < sinks; the layer's own bias (padding, causal) still
applies. The window is calibrated per layer: the attended distance that holds WINDOW_COVERAGE of
the attention mass. `WindowAttention` scores every key and masks (any bias, any S and T);
`WindowAttentionBanded[Causal]` (passes/mixers/_band.py) scores only the band, linear in the
length, and is used when calibration shows the bias only hides keys and S == T.
"""

from __future__ import annotations

import numpy as np

from graphopt.functions import FLOAT, INT, define
from graphopt.passes.attention.masks import HIDDEN
from graphopt.passes.mixers import _band, edit, spec as specs, state, transfer

WINDOW_COVERAGE = 0.95
BAND_ATTRIBUTES = (("scale", FLOAT), ("window", INT), ("sinks", INT))


def banded_name(causal: bool) -> str:
    return f"WindowAttentionBanded{'Causal' if causal else ''}"


@define("WindowAttention", ("Q", "KT", "V", "bias"), attributes=BAND_ATTRIBUTES)
def window_attention_body(op, c, q, kt, v, bias):
    """Y = softmax(scale Q K^T + band + bias) V, band 0 inside the window (and sinks), lowest outside."""
    band = op.Where(_band.full_band(op, c, q, kt), c.f32(0.0), c.f32(_band.LOWEST))
    scores = op.Add(op.Add(op.Mul(op.MatMul(q, kt), c.attr("scale")), band), bias)
    return op.MatMul(op.Softmax(scores, axis=-1), v)


def _banded_body(causal: bool):
    def body(op, c, q, kt, v, keymask):
        b = _band.blocks(op, c, q, kt, v, keymask, causal)
        if not causal:
            return b.unblock(op.MatMul(op.Softmax(b.masked_band, axis=-1), b.vband))
        # one softmax over the band and the sinks together
        minus1 = c.i64([-1])
        band_len = op.Shape(b.masked_band, start=-1)
        total_len = op.Add(band_len, op.Shape(b.masked_s, start=-1))
        p = op.Softmax(op.Concat(b.masked_band, b.masked_s, axis=-1), axis=-1)
        out_band = op.MatMul(op.Slice(p, c.i64([0]), band_len, minus1), b.vband)
        out_s = op.MatMul(op.Slice(p, band_len, total_len, minus1), b.vs5)
        return b.unblock(op.Add(out_band, out_s))

    return body


for _causal in (False, True):
    define(banded_name(_causal), ("Q", "KT", "V", "keymask"), attributes=BAND_ATTRIBUTES)(_banded_body(_causal))


def band_mask(s: int, t: int, window: int, sinks: int):
    """The torch twin of `_band.full_band`: [S, T] booleans."""
    import torch

    i = torch.arange(s)[:, None] + (t - s)
    j = torch.arange(t)[None, :]
    return ((i - j).abs() <= window) | (j < sinks)


def window_attention(q, kt, v, bias, scale: float, window: int, sinks: int = 0):
    """The torch reference."""
    import torch

    allowed = band_mask(q.shape[-2], kt.shape[-1], window, sinks)
    band = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    return transfer.softmax_attention(q, kt, v, band if bias is None else band + bias, scale)


def choose_window(cap, node, coverage: float = WINDOW_COVERAGE) -> int:
    """The effective attended distance: the smallest w such that, over the calibration queries
    (real tokens only), keys within distance w carry `coverage` of the attention mass."""
    import torch

    scale = specs.scale_of(node)
    total = np.zeros(0)
    with torch.no_grad():
        for q, kt, b in zip(cap["q"], cap["kt"], cap["bias"]):
            q, kt = torch.as_tensor(q), torch.as_tensor(kt)
            scores = (q @ kt) * scale + (torch.as_tensor(b) if b is not None else 0)
            probs = torch.softmax(scores, dim=-1)  # [B, H, S, T]
            s, t = probs.shape[-2:]
            dist = ((torch.arange(s)[:, None] + (t - s)) - torch.arange(t)[None, :]).abs()
            by_distance = torch.zeros(*probs.shape[:-1], t).scatter_add_(-1, dist.expand_as(probs).contiguous(), probs)
            if b is not None:  # padded queries do not count
                by_distance = by_distance * transfer.keymask(b)[:, :, t - s:, :]
            mass = by_distance.sum(dim=(0, 1, 2)).numpy()
            if len(mass) > len(total):
                total = np.pad(total, (0, len(mass) - len(total)))
            total[: len(mass)] += mass
    cumulative = np.cumsum(total) / total.sum()
    return int(np.searchsorted(cumulative, coverage))


def mask_only(cap) -> bool:
    """Whether the layer's bias only hides keys (entries 0 or hidden) on every captured batch:
    then the key mask says all it does, and the window can be computed band only."""
    return all(b is None or bool(np.all((b == 0) | (b <= HIDDEN))) for b in cap["bias"])


def swap_band(model, node, kind: str, full: str, banded: str, w: dict, params) -> str:
    """The edit window and hybrid share: the banded body when the calibration allows it, else
    the full-score body; `params(b)` adds the kind's weight inputs."""
    b = edit.Builder(model, node)
    q, kt, v = node.inputs[:3]
    window, sinks = int(w["window"]), specs.sinks_for(node)
    attrs = {**edit.scale_attr(node), "window": window, "sinks": sinks}
    use_band = w.get("mask_only") and edit.same_length(q, kt) and state.find_caches(node) is None
    if use_band:  # only the band is scored: linear in the sequence length
        op, inputs = banded, [q, kt, v, edit.keymask(b), *params(b)]
    else:  # every score, masked (a bias with values, a KV cache, or lengths not known equal)
        op, inputs = full, [q, kt, v, edit.bias_or_zero(b), *params(b)]
    b.install(b.call(op, inputs, suffix=kind, **attrs))
    return f"{op} (window {window}, sinks {sinks})"


class Window(specs.MixerKind):
    kind = "window"
    names = ("window",)

    def fit(self, spec, node, layer, fit, held, steps, seed):
        return {"window": spec.cap(choose_window(fit, node)), "mask_only": mask_only(fit) and mask_only(held)}

    def output(self, spec, node, q, kt, v, bias, w):
        import torch

        return window_attention(q, kt, v, None if bias is None else torch.as_tensor(bias), specs.scale_of(node),
                                int(w["window"]), specs.sinks_for(node))

    def describe(self, spec, node, w):
        return {"window": w["window"], "sinks": specs.sinks_for(node)}

    def swap(self, model, node, spec, w, *, quadratic, layer):
        causal = specs.is_causal(node)
        return swap_band(model, node, "window", "WindowAttention", banded_name(causal), w, lambda b: [])


specs.register(Window())
