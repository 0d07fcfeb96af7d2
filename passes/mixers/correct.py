"""Output-side correction: after the mixers are fitted and swapped, each swapped layer's output
projection is refitted so that the layer's output matches the original's.

For swapped layer i with output projection y = x W + b (the MatMul, and the Add of a constant
bias when there is one, that read the attention output through its transposes and reshapes):

    minimize  sum_rows || x' (W + dW) + (b + db) - t ||^2 + lam ||dW||^2

where t = x W + b is the original model's projection output and x' the swapped model's
projection input on the same calibration rows (padded tokens excluded). Closed form (ridge
towards W): [dW; db] = (X'^T X' + lam I)^-1 X'^T (t - x' W - b), X' = [x', 1]; then dW is
truncated to rank r (`truncate`). Held-out rows choose lam and r, rank 0 (no correction)
included, so a layer's held-out error never rises. W + dW replaces W: the swapped model keeps
its shapes, its ops and its speed.

Layers are corrected in graph order, each on the model with the earlier corrections in place,
so a layer also absorbs what the earlier swaps did to its input. Held-out end-to-end fidelity
(the mean cosine and the worst row's) decides whether the corrections stay (mixers/step.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from graphopt import calibration
from graphopt.ir import ir
from graphopt.model import Model
from graphopt.passes._weights import add_initializer, const_array
from graphopt.passes.mixers import transfer

THROUGH = ("Transpose", "Reshape", "Where", "IsNaN", "Identity", "Squeeze", "Unsqueeze", "Flatten")
RIDGE = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # lam as a multiple of the mean diagonal of X'^T X'
RANK_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
MAX_ROWS = 8192


class Projection:
    """The output projection of one attention layer: MatMul `node` (weight [K, N] constant) and
    the Add of a constant [N] bias after it, when there is one."""

    def __init__(self, matmul: ir.Node, add: ir.Node | None, bias_index: int | None) -> None:
        self.matmul, self.add, self.bias_index = matmul, add, bias_index

    @property
    def x(self) -> ir.Value:
        return self.matmul.inputs[0]

    @property
    def y(self) -> ir.Value:
        return self.add.outputs[0] if self.add is not None else self.matmul.outputs[0]

    @property
    def w(self) -> np.ndarray:
        return const_array(self.matmul.inputs[1])

    @property
    def b(self) -> np.ndarray | None:
        return None if self.add is None else const_array(self.add.inputs[self.bias_index])


def find_projection(node: ir.Node) -> Projection | None:
    """The MatMul with a constant 2-D weight that reads `node`'s output through layout-only ops
    (and a NaN guard), and its bias Add; None when there is not exactly one."""
    found, frontier, seen = [], [node.outputs[0]], set()
    while frontier:
        value = frontier.pop()
        for use in value.uses():
            reader = use.node
            if id(reader) in seen:
                continue
            seen.add(id(reader))
            w = const_array(reader.inputs[1]) if reader.op_type == "MatMul" and len(reader.inputs) == 2 else None
            if reader.op_type == "MatMul" and use.idx == 0 and w is not None and w.ndim == 2:
                found.append(reader)
            elif reader.op_type in THROUGH:
                frontier.extend(reader.outputs)
            else:
                return None  # the attention output reaches something that is not the projection
    if len(found) != 1:
        return None
    matmul = found[0]
    uses = list(matmul.outputs[0].uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        add, other = uses[0].node, 1 - uses[0].idx
        bias = const_array(add.inputs[other])
        if bias is not None and bias.shape == (const_array(matmul.inputs[1]).shape[1],):
            return Projection(matmul, add, other)
    return Projection(matmul, None, None)


def _rows(arrays: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]) -> np.ndarray:
    """Real-token rows of [B, S, N] captures, flattened to [rows, N]."""
    out = []
    for a, m in zip(arrays, masks):
        flat = a.reshape(-1, a.shape[-1])
        out.append(flat if m is None or m.size != len(flat) else flat[m.ravel()])
    rows = np.concatenate(out).astype(np.float64)
    if len(rows) > MAX_ROWS:
        rows = rows[np.random.default_rng(0).choice(len(rows), MAX_ROWS, replace=False)]
    return rows


def query_masks(cap: dict) -> list[np.ndarray | None]:
    """Per captured batch: [B, S] booleans, true on real queries (None: every query is real);
    the key mask the mixers' fits use (transfer.query_mask)."""
    masks = []
    for q, kt, bias in zip(cap["q"], cap["kt"], cap["bias"]):
        if bias is None:
            masks.append(None)
            continue
        real = transfer.query_mask(bias, kt.shape[-1], q.shape[-2]).numpy()[:, 0, :, 0] > 0  # [B|1, S]
        masks.append(None if real.all() else np.broadcast_to(real, (q.shape[0], q.shape[-2])))
    return masks


def truncations(dw: np.ndarray, ranks: Sequence[int]) -> dict[int, np.ndarray]:
    """The best rank-r approximation of dw for each r (Eckart-Young): dw V_r V_r^T, V_r the
    eigenvectors of dw^T dw with the r largest eigenvalues, i.e. dw's top right singular vectors.
    Not np.linalg.svd: OpenBLAS's SVD intermittently fails to converge on finite matrices (it
    did here on a rank-deficient dW, numpy/numpy#11887); the symmetric eigensolver does not."""
    _, vecs = np.linalg.eigh(dw.T @ dw)  # ascending eigenvalues
    return {r: dw @ vecs[:, -r:] @ vecs[:, -r:].T for r in ranks}


def solve(x: np.ndarray, t: np.ndarray, w: np.ndarray, b: np.ndarray | None, x_held: np.ndarray,
          t_held: np.ndarray) -> dict[str, Any]:
    """The correction (dW, db) with the lowest held-out error over lam x rank (rank 0 included)."""
    with_bias = b is not None
    bias = b if with_bias else np.zeros(w.shape[1])

    def design(a):
        return np.concatenate([a, np.ones((len(a), 1))], axis=1) if with_bias else a

    xa = design(x)
    residual = t - x @ w - bias
    gram, rhs = xa.T @ xa, xa.T @ residual
    scale = float(np.mean(np.diag(gram))) or 1.0
    base = float(np.linalg.norm(x_held @ w + bias - t_held))
    norm = float(np.linalg.norm(t_held - t_held.mean(0))) or 1.0
    best = {"rank": 0, "ridge": None, "error": base / norm, "dw": None, "db": None}
    full = min(w.shape)
    for lam in RIDGE:
        delta = np.linalg.solve(gram + lam * scale * np.eye(len(gram)), rhs)
        dw, db = (delta[:-1], delta[-1]) if with_bias else (delta, None)
        for r, dw_r in truncations(dw, [max(1, int(round(frac * full))) for frac in RANK_FRACTIONS]).items():
            err = float(np.linalg.norm(x_held @ (w + dw_r) + bias + (0 if db is None else db) - t_held)) / norm
            if err < best["error"]:
                best = {"rank": r, "ridge": lam, "error": err, "dw": dw_r, "db": db}
    best["error_before"] = base / norm
    return best


def correct(original: Model, swapped: Model, nodes: Sequence[ir.Node], layers: Sequence[int], fit: Sequence,
            held: Sequence, fit_caps: Sequence[dict], held_caps: Sequence[dict],
            say=lambda _done, _total, _what: None) -> tuple[Model, list[dict[str, Any]]]:
    """A copy of `swapped` with each layer in `layers` (indices into `nodes`, the original's
    attention ops) corrected in graph order; per layer: held-out relative error of the
    projection output before and after, rank, ridge, or why it was left alone."""
    work = swapped.clone()
    rows: list[dict[str, Any]] = []
    projections = {i: find_projection(nodes[i]) for i in layers}
    split = len(fit)  # fit and held-out batches run in one session per model, then split here
    targets = {}
    wanted = [p.y.name for p in projections.values() if p is not None]
    if wanted:
        ref = calibration.run_exposed(original, wanted, [*fit, *held])
        targets = {i: [r[p.y.name] for r in ref] for i, p in projections.items() if p is not None}
    by_name = {nd.name: nd for nd in work.ir.graph}  # the swap keeps the projections' nodes and names
    for n, i in enumerate(sorted(layers)):
        p = projections[i]
        if p is None:
            rows.append({"index": i, "corrected": False, "why": "no single constant output projection after the attention"})
            continue
        say(n, len(layers), f"correcting the output projection of layer {i} ({n + 1}/{len(layers)})")
        mine = by_name.get(p.matmul.name)
        if mine is None:
            rows.append({"index": i, "corrected": False, "why": f"projection '{p.matmul.name}' not found after the swap"})
            continue
        name = mine.inputs[0].name
        xs = [r[name] for r in calibration.run_exposed(work, [name], [*fit, *held])]
        fit_masks, held_masks = query_masks(fit_caps[i]), query_masks(held_caps[i])
        x, xh = _rows(xs[:split], fit_masks), _rows(xs[split:], held_masks)
        t, th = _rows(targets[i][:split], fit_masks), _rows(targets[i][split:], held_masks)
        w, b = p.w.astype(np.float64), None if p.b is None else p.b.astype(np.float64)
        best = solve(x, t, w, b, xh, th)
        row = {"index": i, "projection": p.matmul.name, "rel_error_before": round(best["error_before"], 6),
               "rel_error_after": round(best["error"], 6), "rank": best["rank"], "of_rank": min(w.shape),
               "ridge": best["ridge"], "fit_rows": len(x), "held_rows": len(xh)}
        if best["dw"] is None:
            rows.append({**row, "corrected": False, "why": "no rank and ridge lowered the held-out error"})
            continue
        graph = work.ir.graph
        mine.replace_input_with(1, add_initializer(graph, mine.inputs[1], (w + best["dw"]).astype(np.float32), "corrected"))
        if best["db"] is not None:  # a bias was fitted only where the projection has its Add
            add, k = by_name[p.add.name], p.bias_index
            add.replace_input_with(k, add_initializer(graph, add.inputs[k], (b + best["db"]).astype(np.float32), "corrected"))
        rows.append({**row, "corrected": True})
    return work, rows
