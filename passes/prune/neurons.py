"""Structured pruning, training-free: rank a site's units (FFN neurons, attention heads) on
calibration rows, keep the top ones, and refit the output projection so the block's output
matches the original's. A unit is `group` columns of the rows the output projection reads (1
for a neuron, the head size for a head); below, a neuron j stands for a unit's columns u, its
cost tr(W*_u^T [(G^-1)_uu]^-1 W*_u) and its update the block Schur complement.

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

import numpy as np

from graphopt import ops
from graphopt.ir import ir
from graphopt.passes._edits import append_add
from graphopt.passes._weights import add_initializer, const_array

RIDGE = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # lam as a multiple of the mean diagonal of X^T X


def importance(h: np.ndarray, w2: np.ndarray) -> np.ndarray:
    return (h * h).mean(axis=0) * (w2.astype(np.float64) ** 2).sum(axis=1)


def removal_order(h: np.ndarray, w2: np.ndarray, remove: int, lam: float = 1e-3, group: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The first `remove` units (neurons, or heads of `group` columns each) to prune, in order
    (OBS on the refit; see the module doc), and after each removal the squared error of the
    refitted block output so far, summed over the rows. For a unit with columns u the cost is
    tr(W*_u^T [(G^-1)_uu]^-1 W*_u), and the update its block Schur complement."""
    k = h.shape[1]
    units = k // group
    x = np.concatenate([h, np.ones((len(h), 1))], axis=1)
    target = h @ w2.astype(np.float64)
    gram = x.T @ x
    gram += lam * float(np.mean(np.diag(gram)) or 1.0) * np.eye(k + 1)
    inv = np.linalg.inv(gram)
    w = inv @ (x.T @ target)
    cols = np.arange(units * group).reshape(units, group)
    alive = np.ones(units, bool)
    order, errors, total = [], [], 0.0
    for _ in range(min(remove, units)):
        if group == 1:
            cost = (w[:k] * w[:k]).sum(axis=1) / np.maximum(np.diag(inv)[:k], 1e-300)
        else:
            blocks = inv[cols[:, :, None], cols[:, None, :]] + 1e-300 * np.eye(group)
            wu = w[cols]  # [units, group, n]
            cost = (np.linalg.solve(blocks, wu) * wu).sum(axis=(1, 2))
        j = int(np.argmin(np.where(alive, cost, np.inf)))
        order.append(j)
        total += float(cost[j])
        errors.append(total)
        c = cols[j]
        block = inv[np.ix_(c, c)]
        gain = np.linalg.solve(block, np.eye(group)) if group > 1 else 1.0 / block
        part = inv[:, c]
        w -= part @ (gain @ w[c])
        inv -= part @ gain @ part.T
        alive[j] = False
        inv[c, :] = 0.0
        inv[:, c] = 0.0
        inv[c, c] = 1.0  # keeps the removed block invertible for the batched solve; `alive` masks it
        w[c] = 0.0
    return np.array(order, dtype=np.int64), np.array(errors)


@dataclasses.dataclass
class Refit:
    keep: np.ndarray  # sorted indices of the kept units (neurons, heads); empty: the block is dropped
    w2: np.ndarray  # [len(keep) x group, n]
    shift: np.ndarray  # [n], added to the output
    held_error: float  # relative error of the block's output on held-out rows, after the refit
    held_error_unrefitted: float  # the same with W2[keep] as it was
    ridge: float | None  # the chosen lam multiple; None: the unrefitted rows won


def _rel(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.linalg.norm(pred - target) / max(np.linalg.norm(target), 1e-30))


def columns(keep: np.ndarray, group: int) -> np.ndarray:
    """The row columns of units `keep`, `group` each."""
    return (np.asarray(keep, np.int64)[:, None] * group + np.arange(group)).reshape(-1)


def refit(h: np.ndarray, h_held: np.ndarray, w2: np.ndarray, keep: np.ndarray, group: int = 1) -> Refit:
    """The kept units' down projection refitted on `h` (fit rows) and chosen on `h_held`;
    with nothing kept, the block's output becomes the constant that fits best (its mean)."""
    w = w2.astype(np.float64)
    target, target_held = h @ w, h_held @ w
    cols = columns(keep, group)
    x = np.concatenate([h[:, cols], np.ones((len(h), 1))], axis=1)
    x_held = np.concatenate([h_held[:, cols], np.ones((len(h_held), 1))], axis=1)
    prior = np.concatenate([w[cols], np.zeros((1, w.shape[1]))])
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


def output_bias(site) -> tuple[ir.Node, int] | None:
    """The Add that adds a constant [n] bias to the site's output (its only reader), and the
    bias's input index; None when there is none."""
    uses = list(site.out.uses())
    add = uses[0].node if len(uses) == 1 and not site.out.is_graph_output() else None
    if add is None or (add.domain, add.op_type) != ops.ADD:
        return None
    bias = const_array(add.inputs[1 - uses[0].idx])
    return (add, 1 - uses[0].idx) if bias is not None and bias.shape == (site.w2.shape[1],) else None


def residual_add(site) -> ir.Node | None:
    """The Add that adds what the block writes (after its bias) to the residual stream."""
    found = output_bias(site)
    value = found[0].outputs[0] if found else site.out
    uses = list(value.uses())
    if value.is_graph_output() or len(uses) != 1 or (uses[0].node.domain, uses[0].node.op_type) != ops.ADD:
        return None
    return uses[0].node


def drop_blocker(site) -> str | None:
    """A block can be dropped (its output a constant) when what it writes (after its bias) is
    read by one Add whose other input, the residual, has its full shape."""
    found = output_bias(site)
    value = found[0].outputs[0] if found else site.out
    add = residual_add(site)
    if add is None:
        return f"its output '{value.name}' is not read by one residual Add"
    other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
    if other.shape is None or value.shape is None or list(other.shape) != list(value.shape):
        return f"the residual beside '{value.name}' does not have its shape"
    return None


def apply(graph: ir.Graph, site, fit: Refit) -> None:
    """Write the smaller matrices: the site shrinks upstream (W1's columns, or the heads'
    projection columns), W2' is the refit, the shift goes into the output (the down
    projection's bias Add when it has one, else a new Add). With nothing kept the block is
    dropped: the residual Add reads the constant bias + shift, and what fed the block is dead."""
    found = output_bias(site)
    bias = const_array(found[0].inputs[found[1]]) if found else None
    if len(fit.keep) == 0:
        value = found[0].outputs[0] if found else site.out
        use = next(iter(value.uses()))
        constant = (fit.shift if bias is None else bias + fit.shift).astype(fit.shift.dtype)
        use.node.replace_input_with(use.idx, add_initializer(graph, value, constant, "dropped"))
        return  # the caller removes what is dead
    site.shrink(graph, fit.keep)
    site.down.replace_input_with(1, add_initializer(graph, site.down.inputs[1], np.ascontiguousarray(fit.w2), "refit"))
    if found:
        add, index = found
        add.replace_input_with(index, add_initializer(graph, add.inputs[index], (bias + fit.shift).astype(bias.dtype), "refit"))
    elif np.any(fit.shift):
        append_add(graph, site.down, add_initializer(graph, site.down.inputs[1], fit.shift, "refit_shift"))
