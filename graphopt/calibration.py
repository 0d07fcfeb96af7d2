"""Calibration: the data an approximate step fits on and measures on, and running the model with
chosen intermediate values exposed.

    data = calibration.split(model, calib, seed=0)     # fit / held-out batches, source, warning
    rows = calibration.run_exposed(model, ["q", "k"], data.fit)  # per batch {name: array}

`calib` is the user's: an .npz path, a dict of arrays (a batch of more than one row is split in
halves: fit on the first, measure on the second), a list of dicts (the first half of the
batches fits), or a callable returning one of these. Without it, generated inputs are used and
`warning` says loudly that the numbers say little about real data.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
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


def rows(batches: Sequence[Feeds]) -> int:
    return int(sum(next(iter(b.values())).shape[0] for b in batches))


def seq_hint(batches: Sequence[Feeds]) -> int:
    """The sequence length the batches run at (the longest second axis), 128 if none."""
    shapes = [a.shape for b in batches for a in b.values() if a.ndim >= 2]
    return int(max((s[1] for s in shapes), default=128))
