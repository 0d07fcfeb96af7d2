"""FFN neuron pruning, training-free: rank the intermediate neurons on calibration rows, keep
the top ones, and refit the down projection so the block's output matches the original's.

Order of removal (Optimal Brain Surgeon on the refit itself, as SparseGPT does for weights):
with X = [h, 1], G = X^T X + lam I and W* = G^-1 X^T T the least-squares down projection,
removing neuron j and refitting the others raises the squared error by ||W*_j||^2 / (G^-1)_jj;
the neuron with the lowest such cost goes first, then G^-1 and W* are updated in closed form
(the Schur complement) and the next cost is read off. Correlated neurons, which a refit can
stand in for, go early; the constant column (the shift) is never removed. `importance` (the
output energy a neuron carries, mean(h_j^2) ||W2[j]||^2) is the cheaper score it replaces.
Refit, for the kept set S (X = [h_S, 1] on calibration rows, T = h W2 the original output):
    [W2'; c] = argmin ||X [W2'; c] - T||^2 + lam ||W2' - W2[S]||^2        (ridge towards W2[S])
lam chosen on held-out rows from RIDGE (the unrefitted W2[S], lam = inf, included), so the
refit never raises a layer's held-out error; c is added to the block's output bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from graphopt.ir import ir
from graphopt.passes._edits import append_add
from graphopt.passes._weights import add_initializer, const_array
from graphopt.passes.prune.sites import FfnSite, _bias_input

RIDGE = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # lam as a multiple of the mean diagonal of X^T X
MAX_ROWS = 8192


def rows(arrays: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] = ()) -> np.ndarray:
    """[.., k] captures flattened to at most MAX_ROWS rows (a seeded sample), float64; with a
    [B, S] mask per capture (an attention mask), padded tokens' rows are left out."""
    masks = list(masks) or [None] * len(arrays)
    parts = []
    for a, m in zip(arrays, masks):
        flat = a.reshape(-1, a.shape[-1])
        parts.append(flat[m.reshape(-1) != 0] if m is not None and m.size == len(flat) else flat)
    flat = np.concatenate(parts).astype(np.float64)
    if len(flat) > MAX_ROWS:
        flat = flat[np.random.default_rng(0).choice(len(flat), MAX_ROWS, replace=False)]
    return flat


def token_masks(batches: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray | None]:
    """Per batch, the [B, S] attention mask among its inputs (an integer or boolean input named
    like a mask, 0 on padding), or None."""
    found = []
    for feeds in batches:
        mask = next((v for k, v in feeds.items() if "mask" in k.lower() and v.ndim == 2
                     and (v.dtype == bool or np.issubdtype(v.dtype, np.integer)) and set(np.unique(v)) <= {0, 1}), None)
        found.append(mask)
    return found


def importance(h: np.ndarray, w2: np.ndarray) -> np.ndarray:
    return (h * h).mean(axis=0) * (w2.astype(np.float64) ** 2).sum(axis=1)


def removal_order(h: np.ndarray, w2: np.ndarray, remove: int, lam: float = 1e-3) -> np.ndarray:
    """The first `remove` neurons to prune, in order (OBS on the refit; see the module doc)."""
    k = h.shape[1]
    x = np.concatenate([h, np.ones((len(h), 1))], axis=1)
    target = h @ w2.astype(np.float64)
    gram = x.T @ x
    gram += lam * float(np.mean(np.diag(gram)) or 1.0) * np.eye(k + 1)
    inv = np.linalg.inv(gram)
    w = inv @ (x.T @ target)
    alive = np.ones(k + 1, bool)
    alive[k] = False  # the shift column stays: never a candidate
    order = []
    for _ in range(min(remove, k - 1)):
        diag = np.diag(inv)
        cost = np.where(alive, (w * w).sum(axis=1) / np.maximum(diag, 1e-300), np.inf)
        j = int(np.argmin(cost))
        order.append(j)
        col = inv[:, j].copy()
        w -= np.outer(col / inv[j, j], w[j])
        inv -= np.outer(col, col) / inv[j, j]
        alive[j] = False
        inv[j, :] = inv[:, j] = 0.0
        w[j] = 0.0
    return np.array(order, dtype=np.int64)


@dataclasses.dataclass
class Refit:
    keep: np.ndarray  # sorted indices of the kept neurons
    w2: np.ndarray  # [len(keep), n]
    shift: np.ndarray  # [n], added to the output
    held_error: float  # relative error of the block's output on held-out rows, after the refit
    held_error_unrefitted: float  # the same with W2[keep] as it was
    ridge: float | None  # the chosen lam multiple; None: the unrefitted rows won


def _rel(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(pred - target) / max(np.linalg.norm(target), 1e-30))


def refit(h: np.ndarray, h_held: np.ndarray, w2: np.ndarray, keep: np.ndarray) -> Refit:
    """The kept neurons' down projection refitted on `h` (fit rows) and chosen on `h_held`."""
    w = w2.astype(np.float64)
    target, target_held = h @ w, h_held @ w
    x = np.concatenate([h[:, keep], np.ones((len(h), 1))], axis=1)
    x_held = np.concatenate([h_held[:, keep], np.ones((len(h_held), 1))], axis=1)
    prior = np.concatenate([w[keep], np.zeros((1, w.shape[1]))])
    gram, rhs = x.T @ x, x.T @ target
    scale = float(np.mean(np.diag(gram))) or 1.0
    best = (_rel(x_held @ prior, target_held), None, prior)
    unrefitted = best[0]
    for lam in RIDGE:
        reg = lam * scale * np.eye(len(gram))
        reg[-1, -1] = 0.0  # the shift is not pulled towards 0
        solved = np.linalg.solve(gram + reg, rhs + reg @ prior)
        err = _rel(x_held @ solved, target_held)
        if err < best[0]:
            best = (err, lam, solved)
    err, lam, solved = best
    return Refit(keep, solved[:-1].astype(w2.dtype), solved[-1].astype(w2.dtype), err, unrefitted, lam)


def apply(graph: ir.Graph, site: FfnSite, fit: Refit) -> None:
    """Write the smaller matrices: W1[:, keep], b1[keep], the refitted W2', and the shift into
    the output (the down projection's bias Add when it has one, else a new Add)."""
    keep = fit.keep
    site.up.replace_input_with(1, add_initializer(graph, site.up.inputs[1], np.ascontiguousarray(site.w1[:, keep]), "pruned"))
    if site.up_bias is not None:
        bias_value = _bias_input(site.up_bias)
        index = list(site.up_bias.inputs).index(bias_value)
        site.up_bias.replace_input_with(index, add_initializer(graph, bias_value, np.ascontiguousarray(site.b1[keep]), "pruned"))
    site.down.replace_input_with(1, add_initializer(graph, site.down.inputs[1], np.ascontiguousarray(fit.w2), "refit"))
    uses = list(site.out.uses())
    add = uses[0].node if len(uses) == 1 and (uses[0].node.domain, uses[0].node.op_type) == ("", "Add") else None
    bias = const_array(add.inputs[1 - uses[0].idx]) if add is not None else None
    if bias is not None and bias.shape == fit.shift.shape:
        index = 1 - uses[0].idx
        add.replace_input_with(index, add_initializer(graph, add.inputs[index], (bias + fit.shift).astype(bias.dtype), "refit"))
    elif np.any(fit.shift):
        append_add(graph, site.down, add_initializer(graph, site.down.inputs[1], fit.shift, "refit_shift"))
    for value in (site.up.outputs[0], *(site.up_bias.outputs if site.up_bias is not None else ()), site.hidden):
        value.shape = None  # the intermediate width changed: inference recomputes it
