"""End-to-end fidelity: how far an approximate step moved the model's outputs, measured on
held-out batches against the original's outputs (the one measure every approximate step's
bound is checked with)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphopt import verify
from graphopt.model import Model

Feeds = Mapping[str, np.ndarray]


def end_to_end(refs: Sequence[Mapping[str, np.ndarray]], swapped: Model, batches: Sequence[Feeds]) -> dict[str, Any]:
    """`swapped` against the original's outputs `refs` on the same `batches`, per output: cosine
    per row (mean and min over held-out rows), max abs error, and the KL divergence of the
    softmax for outputs named like logits."""
    gots = [verify.run(swapped, f) for f in batches]
    out = {}
    for name in refs[0]:
        if name not in gots[0]:  # a KV cache output replaced by a state (report["decode"])
            continue
        cosines, worst, kls = [], 0.0, []
        for r, g in zip(refs, gots):
            a, b = (np.atleast_1d(x[name]).astype(np.float64) for x in (r, g))  # rows: the leading axis
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            cosines.extend((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30))
            worst = max(worst, float(np.abs(a - b).max()))
            if "logit" in name.lower():
                kls.append(_kl(r[name], g[name]))
        entry = {"mean_cosine": round(float(np.mean(cosines)), 6), "min_cosine": round(float(np.min(cosines)), 6),
                 "max_abs_error": worst}
        if kls:
            entry["kl_divergence"] = float(np.mean(kls))
        out[name] = entry
    return out


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def worst_mean_cosine(report: Mapping[str, Mapping[str, Any]]) -> float:
    """The lowest per-output mean cosine of an `end_to_end` report (1.0 when empty)."""
    return min((v["mean_cosine"] for v in report.values()), default=1.0)


def worst_min_cosine(report: Mapping[str, Mapping[str, Any]]) -> float:
    """The lowest per-output min cosine of an `end_to_end` report (1.0 when empty)."""
    return min((v["min_cosine"] for v in report.values() if "min_cosine" in v), default=1.0)
