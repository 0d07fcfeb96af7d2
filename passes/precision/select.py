"""Which layers go to low precision: the selection int8 and int4 share.

1. A layer whose low-precision form is not faster alone, at its calibrated shape on the target,
   stays float (`kept_because` says so).
2. The others are ordered by measured gain per local error (ms saved / relative error).
3. The longest prefix of that order whose held-out end-to-end mean cosine is >= the bound is
   kept: a binary search over prefix lengths (fidelity falls as layers are added).
Entries are the step's per-layer report rows: "node", "float_ms", f"{low}_ms", "rel_error".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from graphopt import fidelity


def faster(layers: list[dict[str, Any]], low: str) -> list[dict[str, Any]]:
    """The rows whose `low` form was measured faster (1)."""
    key = f"{low}_ms"
    return [e for e in layers if e[key] is not None and e[key] < e["float_ms"]]


def order(layers: list[dict[str, Any]], low: str) -> list[dict[str, Any]]:
    """The faster-in-`low` rows by gain per error; the others marked float32 (1, 2)."""
    key = f"{low}_ms"
    faster_rows = faster(layers, low)
    for e in layers:
        if e not in faster_rows:
            e["precision"], e["kept_because"] = "float32", f"its {low} form is not faster on this machine"
    return sorted(faster_rows, key=lambda e: -(e["float_ms"] - e[key]) / ((e["rel_error"] or 1e-3) + 1e-6))


def longest_prefix(ordered: list[dict[str, Any]], measure: Callable[[int], dict], bound: float) -> tuple[int, dict | None]:
    """(count, its end-to-end fidelity) of the longest prefix meeting `bound` (3); count 0: None."""
    lo, hi, best, best_fid = 0, len(ordered), 0, None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = measure(mid) if mid else None
        if mid == 0 or fidelity.worst_mean_cosine(candidate) >= bound:
            best, best_fid, lo = mid, candidate, mid + 1
        else:
            hi = mid - 1
    return best, best_fid


def mark(ordered: list[dict[str, Any]], count: int, low: str, bound: float) -> None:
    """Each ordered row's precision, and why a row outside the kept prefix stayed float."""
    for rank, e in enumerate(ordered):
        e["precision"] = low if rank < count else "float32"
        if rank >= count:
            e["kept_because"] = (f"outside the {count} layers (of {len(ordered)}, by gain per error) that keep the "
                                 f"end-to-end mean cosine >= {bound}")


def note(low: str, count: int, faster: int, bound: float) -> dict[str, str]:
    """The report's note when nothing went to `low`."""
    if count:
        return {}
    return {"note": f"no layer could go to {low} within the bound {bound}: the model stays float32" if faster
            else f"no layer's {low} form is faster on this machine: the model stays float32"}
