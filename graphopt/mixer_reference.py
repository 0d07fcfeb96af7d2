"""Straightforward torch implementations of the token mixers: the calibration objective
(differentiable, for fitting Hedgehog maps) and the reference the ONNX bodies are tested
against. Same inputs as the bodies: q [B,H,S,D], kt [B,H,D,T], v [B,H,T,Dv], keymask
[B|1,1,T,1]."""

from __future__ import annotations

import math

import torch

from graphopt.masks import HIDDEN
from graphopt.mixer_bodies import EPS


def feature_map(kind: str, x: torch.Tensor, scale: float, w: torch.Tensor | None = None) -> torch.Tensor:
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


def linear_attention(kind: str, q, kt, v, keymask, scale: float, w=None, causal: bool = False) -> torch.Tensor:
    pq = feature_map(kind, q, scale, w)
    pk = feature_map(kind, kt.transpose(-1, -2), scale, w) * keymask
    if not causal:
        num = pq @ (pk.transpose(-1, -2) @ v)
        den = pq @ pk.sum(-2, keepdim=True).transpose(-1, -2)
    else:
        a = (pq @ pk.transpose(-1, -2)).tril(kt.shape[-1] - q.shape[-2])
        num, den = a @ v, a.sum(-1, keepdim=True)
    return num / (den + EPS)


def linear_state(kind: str, kt, v, keymask, scale: float, w=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrent state of these keys and values: (sum_j phi(k_j)^T v_j [B,H,F,Dv],
    sum_j phi(k_j)^T [B,H,F,1]), what LinearAttention*Recurrent carries between calls."""
    pk = feature_map(kind, kt.transpose(-1, -2), scale, w) * keymask
    return pk.transpose(-1, -2) @ v, pk.sum(-2, keepdim=True).transpose(-1, -2)


def token_conv(q, v, keymask, w, causal: bool = False) -> torch.Tensor:
    """SLAB's depthwise-conv branch (mixer_bodies.token_conv_body): w [H, K, Dv]."""
    k, t = w.shape[1], v.shape[-2]
    before, after = (k - 1, 0) if causal else (k // 2, k // 2)
    padded = torch.nn.functional.pad(v * keymask, (0, 0, before, after))
    out = sum(padded[:, :, j:j + t] * w[None, :, j, None, :] for j in range(k))
    return out[:, :, t - q.shape[-2]:]


def softmax_attention(q, kt, v, bias, scale: float) -> torch.Tensor:
    scores = (q @ kt) * scale
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1) @ v


def pool(v: torch.Tensor, causal: bool = False, queries: int | None = None) -> torch.Tensor:
    """PoolFormer over the value tokens; the last `queries` rows (default: all)."""
    out = _pool(v, causal)
    return out if queries is None else out[..., out.shape[-2] - queries:, :]


def _pool(v: torch.Tensor, causal: bool) -> torch.Tensor:
    if causal:  # tokens i-2..i: pad two in front, average what is real
        padded = torch.nn.functional.pad(v, (0, 0, 2, 0))
        ones = torch.nn.functional.pad(torch.ones_like(v[..., :1]), (0, 0, 2, 0))
        total = torch.nn.functional.avg_pool2d(padded, (3, 1), stride=1) * 3
        count = torch.nn.functional.avg_pool2d(ones, (3, 1), stride=1) * 3
        return total / count - v
    return torch.nn.functional.avg_pool2d(v, (3, 1), stride=1, padding=(1, 0), count_include_pad=False) - v


def window_attention(q, kt, v, bias, scale: float, window: int, sinks: int = 0) -> torch.Tensor:
    s, t = q.shape[-2], kt.shape[-1]
    i = torch.arange(s)[:, None] + (t - s)
    j = torch.arange(t)[None, :]
    allowed = ((i - j).abs() <= window) | (j < sinks)
    band = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    return softmax_attention(q, kt, v, band if bias is None else band + bias, scale)


def hybrid_attention(q, kt, v, bias, scale: float, window: int, sinks: int, w, gamma) -> torch.Tensor:
    """Softmax inside the window (and sinks), Hedgehog linear attention on the other visible
    keys, mixed per head by gamma [1, H, 1, 1] (see mixer_bodies.hybrid_body)."""
    s_len, t_len = q.shape[-2], kt.shape[-1]
    bias = torch.zeros(1, 1, 1, 1) if bias is None else bias
    scores = (q @ kt) * scale + bias
    i = torch.arange(s_len)[:, None] + (t_len - s_len)
    j = torch.arange(t_len)[None, :]
    in_window = (((i - j).abs() <= window) | (j < sinks)).float()
    m = scores.amax(-1, keepdim=True)
    e = torch.exp(scores - m) * in_window
    pq = feature_map("Hedgehog", q, scale, w)
    pk = feature_map("Hedgehog", kt.transpose(-1, -2), scale, w)
    a = (pq @ pk.transpose(-1, -2)) * (1 - in_window) * (bias > HIDDEN).float()
    mix = torch.exp(-m) * gamma
    return (e @ v + mix * (a @ v)) / (e.sum(-1, keepdim=True) + mix * a.sum(-1, keepdim=True) + EPS)
