"""Attention transfer: fit a mixer's parameters so that its output matches the captured softmax
attention output, plus the torch pieces every kind's reference shares. Torch is imported
inside the functions: graphopt runs without it until a mixer is calibrated."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from graphopt.passes.attention.masks import HIDDEN

EPS = 1e-6  # every normalized mixer adds it to its denominator (bodies and references alike)


def softmax_attention(q, kt, v, bias, scale: float):
    """What every mixer approximates: softmax(scale q k^T + bias) v."""
    import torch

    scores = (q @ kt) * scale
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1) @ v


def keymask(bias):
    """The torch twin of the graph edit's key mask: [B|1, 1, T, 1] from the additive bias."""
    import torch

    if bias is None:
        return torch.ones(1, 1, 1, 1)
    visible = (torch.as_tensor(bias)[..., -1:, :] > HIDDEN).float()
    return visible.amin(dim=1, keepdim=True).transpose(-1, -2)


def query_mask(bias, keys: int, queries: int):
    """1 on real queries, 0 on padded ones (their output does not count), broadcastable to y."""
    return keymask(bias)[:, :, keys - queries:] if bias is not None else 1.0


def batches(cap: dict) -> list[tuple]:
    """(q, kt, v, bias, y) per captured batch, as torch tensors (bias may be None)."""
    import torch

    return [tuple(torch.as_tensor(a) if a is not None else None for a in row)
            for row in zip(cap["q"], cap["kt"], cap["v"], cap["bias"], cap["y"])]


def fit(params: Sequence, loss: Callable[[tuple], object], data: Sequence[tuple], steps: int, seed: int,
        lr: float = 1e-2, check: Callable[[], float] | None = None, every: int = 25) -> float | None:
    """Adam on `params` (tensors, or torch parameter groups) for `steps` steps, cycling over
    `data`; `loss(batch)` is a scalar tensor. With `check` (a held-out error, lower is better)
    the parameters are checked before the first step and every `every` steps, and end at the
    best point seen: held-out data chooses the stopping point. Returns that error."""
    import torch

    torch.manual_seed(seed)
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    best, best_state = None, None

    def checkpoint():
        nonlocal best, best_state
        with torch.no_grad():
            error = float(check())
        if best is None or error < best:
            best, best_state = error, [p.detach().clone() for p in tensors]

    for step in range(max(steps, 0)):
        if check is not None and step % every == 0:
            checkpoint()
        value = loss(data[step % len(data)])
        opt.zero_grad()
        value.backward()
        opt.step()
    if check is None:
        return None
    checkpoint()
    with torch.no_grad():
        for p, kept in zip(tensors, best_state):
            p.copy_(kept)
    return best


def relative_error(out, y, mask=1.0):
    """The transfer loss: mean squared error on real queries over the mean square of y."""
    return (((out - y) ** 2) * mask).mean() / (y.pow(2).mean() + 1e-12)


def array(t) -> np.ndarray:
    return t.detach().numpy().astype(np.float32)
