"""Calibration: the data an approximate step fits on and measures on, and running the model with
chosen intermediate values exposed.

    data = calibration.split(model, calib, seed=0)     # fit / held-out batches, source, warning
    rows = calibration.run_exposed(model, ["q", "k"], data.fit)  # per batch {name: array}
    kept = calibration.sample_rows(model, ["q"], data.fit, capacity=8192)  # streamed, bounded

`sample_rows` is the bounded form the steps that fit on rows use (int8's ranges and errors,
pruning's refits): the batches run one at a time and each value keeps a seeded uniform sample
of at most `capacity` rows (its last axis) over all of them, with its exact range, so the
activations held at once do not grow with the number of examples (`--calib-rows`).

`calib` is the user's: an .npz path, a dict of arrays (a batch of more than one row is split in
halves: fit on the first, measure on the second), a list of dicts (the first half of the
batches fits), or a callable returning one of these. Without it, generated inputs are used and
`warning` says loudly that the numbers say little about real data.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Any

import numpy as np

from graphopt import feeds as feeds_mod, verify
from graphopt.errors import InputError
from graphopt.ir import common_passes, ir
from graphopt.model import Model

Feeds = Mapping[str, np.ndarray]
GENERATED_WARNING = ("no calibration data: fitted and measured on generated inputs, which say little about real "
                     "data; pass --calib data.npz")


@dataclasses.dataclass
class Data:
    fit: list[Feeds]
    held: list[Feeds]
    source: str  # "generated", "user arrays" or the .npz path
    warning: str | None = None

    @property
    def fit_rows(self) -> int:
        return rows(self.fit)

    @property
    def held_rows(self) -> int:
        return rows(self.held)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "fit_rows": self.fit_rows, "held_out_rows": self.held_rows,
                **({"warning": self.warning} if self.warning else {})}


def split(model: Model, calib: Any = None, *, holdout: Any = None, seed: int = 0,
          dims: Mapping[str, int] | None = None) -> Data:
    """Fit and held-out batches from `calib`; an explicit `holdout` (batches) is measured on
    and every `calib` batch fits."""
    if calib is None:
        batches = [feeds_mod.make_inputs(model, seed=seed + i, dims=dims) for i in range(4)]
        data = Data(batches[:2], batches[2:], "generated", GENERATED_WARNING)
    else:
        if callable(calib):
            calib = calib()
        source = "user arrays"
        if isinstance(calib, (str, os.PathLike)):
            source, calib = os.fspath(calib), feeds_mod.load_inputs(calib, model)
        data = _halves(calib, source) if holdout is None else Data(_batches(calib), [], source)
    if holdout is not None:
        data = Data(data.fit + data.held, _batches(holdout), data.source, data.warning)
    if data.source != "generated":  # the user's batches: which one, which input, which shape
        for i, feeds in enumerate([*data.fit, *data.held]):
            feeds_mod.check_inputs(feeds, model, where=f"calibration batch {i} of {len(data.fit) + len(data.held)}")
    return data


def _batches(data: Any) -> list[Feeds]:
    return [data] if isinstance(data, Mapping) else list(data)


def _halves(calib: Any, source: str) -> Data:
    if isinstance(calib, Mapping):
        count = next(iter(calib.values())).shape[0]
        if count < 2:
            raise InputError("calibration data needs at least 2 rows (half to fit, half to measure)")
        half = count // 2
        return Data([{k: v[:half] for k, v in calib.items()}], [{k: v[half:] for k, v in calib.items()}], source)
    batches = list(calib)
    if len(batches) < 2:
        raise InputError("calibration data needs at least 2 batches (half to fit, half to measure)")
    half = len(batches) // 2
    return Data(batches[:half], batches[half:], source)


def expose(model: Model | ir.Model, names: Iterable[str], *, only: bool = False) -> Model:
    """A copy of `model` that also returns the named intermediate values as outputs (with
    `only`, returns just them, pruned to what computes them). Untyped values are float32."""
    work = (model.ir if isinstance(model, Model) else model).clone()
    by_name = {v.name: v for node in work.graph for v in node.outputs} | {v.name: v for v in work.graph.inputs}
    wanted = [by_name[n] for n in dict.fromkeys(names) if n in by_name]
    for value in wanted:
        if value.type is None:
            value.type = ir.TensorType(ir.DataType.FLOAT)
    if only:
        work.graph.outputs.clear()
        work.graph.outputs.extend(wanted)
        common_passes.RemoveUnusedNodesPass()(work)
    else:
        work.graph.outputs.extend(v for v in wanted if not v.is_graph_output())
    return Model(work)


def run_exposed(model: Model, names: Iterable[str], batches: Sequence[Feeds]) -> list[dict[str, np.ndarray]]:
    """The model's outputs and the named intermediate values on every batch (one session)."""
    exposed = expose(model, names)
    return [verify.run(exposed, feeds) for feeds in batches]


DEFAULT_ROWS = 8192  # rows of each activation kept by sample_rows (--calib-rows)


@dataclasses.dataclass
class Rows:
    """A value's rows (its last axis) sampled over every batch: at most `capacity` of them,
    uniformly (seeded reservoir), in arrival order while they fit; its exact range; the first
    batch (whole, for what needs a tensor of the model's shape); each batch's range and the
    batch each kept row came from (a per-call quantizer's range)."""

    rows: np.ndarray  # [kept, last] float32
    seen: int  # rows streamed past
    lo: float
    hi: float
    first: np.ndarray
    ranges: np.ndarray  # [batches, 2]: each batch's min and max
    batch: np.ndarray  # [kept]: the batch of each kept row

    @classmethod
    def of(cls, arrays: Iterable[np.ndarray], capacity: int = DEFAULT_ROWS, seed: int = 0) -> Rows:
        """The sample of arrays already in memory (one per batch)."""
        reservoir = _Reservoir(capacity, np.random.default_rng(seed))
        for i, a in enumerate(arrays):
            reservoir.add(np.asarray(a, np.float32), None, i)
        return reservoir.done()


class _Reservoir:
    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity, self.rng = capacity, rng
        self.rows: np.ndarray | None = None
        self.batch: np.ndarray | None = None
        self.seen, self.filled = 0, 0
        self.lo, self.hi = np.inf, -np.inf
        self.first: np.ndarray | None = None
        self.ranges: list[tuple[float, float]] = []

    def add(self, array: np.ndarray, mask: np.ndarray | None, index: int) -> None:
        if self.first is None:
            self.first = array.copy()
        lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.ranges.append((lo, hi))
        flat = array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)
        if mask is not None and mask.size == len(flat):  # padded tokens' rows are left out
            flat = flat[mask.reshape(-1) != 0]
        if self.rows is None:
            self.rows = np.empty((self.capacity, flat.shape[1]), np.float32)
            self.batch = np.empty(self.capacity, np.int64)
        fill = min(self.capacity - self.filled, len(flat))
        self.rows[self.filled:self.filled + fill] = flat[:fill]
        self.batch[self.filled:self.filled + fill] = index
        self.filled += fill
        rest = flat[fill:]
        if len(rest):  # Algorithm R: the t-th row (0-based) replaces a random slot with chance capacity / (t + 1)
            t = self.seen + fill + np.arange(len(rest))
            slot = (self.rng.random(len(rest)) * (t + 1)).astype(np.int64)
            keep = slot < self.capacity
            self.rows[slot[keep]] = rest[keep]  # in order: a later row replacing the same slot wins
            self.batch[slot[keep]] = index
        self.seen += len(flat)

    def done(self) -> Rows:
        n = self.filled
        return Rows(self.rows[:n].copy(), self.seen, float(self.lo), float(self.hi), self.first,
                    np.asarray(self.ranges, np.float64).reshape(-1, 2), self.batch[:n].copy())


def sample_rows(model: Model, names: Iterable[str], batches: Iterable[Feeds], *, capacity: int = DEFAULT_ROWS,
                masked: bool = False, seed: int = 0,
                progress: Callable[[int, int, str], None] | None = None) -> dict[str, Rows]:
    """Each named value's rows over `batches` (an iterable: it is read once, one batch at a
    time), at most `capacity` kept per value; with `masked`, the rows of padded tokens (0 in a
    [B, S] attention mask among the batch's inputs) are left out."""
    if capacity < 1:
        raise InputError(f"--calib-rows must be >= 1, got {capacity}")
    names = list(dict.fromkeys(names))
    exposed = expose(model, names)
    rng = np.random.default_rng(seed)
    kept = {n: _Reservoir(capacity, rng) for n in names}
    total = len(batches) if isinstance(batches, Sized) else 0
    for i, feeds in enumerate(batches):
        out = verify.run(exposed, feeds)
        mask = token_mask(feeds) if masked else None
        for n in names:
            kept[n].add(out[n], mask, i)
        del out
        if progress is not None:
            progress(i + 1, total, "calibrating")
    if any(r.rows is None for r in kept.values()):
        raise InputError("no calibration batch to sample from", hint="pass at least 2 batches")
    return {n: r.done() for n, r in kept.items()}


def token_mask(feeds: Feeds) -> np.ndarray | None:
    """The [B, S] attention mask among a batch's inputs (an integer or boolean input named like a
    mask, 0 on padding), or None."""
    return next((v for k, v in feeds.items() if "mask" in k.lower() and v.ndim == 2
                 and (v.dtype == bool or np.issubdtype(v.dtype, np.integer)) and set(np.unique(v)) <= {0, 1}), None)


def rows(batches: Sequence[Feeds]) -> int:
    return int(sum(next(iter(b.values())).shape[0] for b in batches))


def seq_hint(batches: Sequence[Feeds]) -> int:
    """The sequence length the batches run at (the longest second axis), 128 if none."""
    shapes = [a.shape for b in batches for a in b.values() if a.ndim >= 2]
    return int(max((s[1] for s in shapes), default=128))
