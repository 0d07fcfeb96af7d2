"""Run passes in order, checking each one numerically against the stage before.

Before every pass the model is snapshot (a structural clone sharing tensors).
An exact pass whose output diverges beyond tolerance, that makes the model
unrunnable, or that raises is rolled back and reported: a diverged model is
never handed on silently.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphopt import registry, verify
from graphopt.errors import GraphoptError
from graphopt.model import Model
from graphopt.rewrite import Pass, PassKind

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (index, total, pass name)


@dataclasses.dataclass
class PassRecord:
    name: str
    kind: str
    rewrites: dict[str, int]
    seconds: float
    status: str  # "applied", "no-op", "rolled-back", "failed"
    check: dict[str, Any] | None = None
    note: str = ""
    near_misses: list[str] = dataclasses.field(default_factory=list)

    @property
    def total_rewrites(self) -> int:
        return sum(self.rewrites.values())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PipelineResult:
    model: Model
    records: list[PassRecord]
    reference_outputs: dict[str, np.ndarray] | None  # the input model's outputs on the check feeds
    final_outputs: dict[str, np.ndarray] | None
    notes: list[str]


def run_pipeline(
    model: Model,
    pass_names: Sequence[str],
    *,
    feeds: Mapping[str, np.ndarray] | None = None,
    explain: bool = False,
    progress: Progress | None = None,
) -> PipelineResult:
    """Apply `pass_names` to `model` in place. With `feeds`, check every pass."""
    passes = [registry.get(name) for name in pass_names]  # unknown names fail before any work
    notes: list[str] = []
    reference = _reference_outputs(model, feeds, notes)
    previous = reference
    records = []
    for index, p in enumerate(passes):
        if progress:
            progress(index, len(passes), p.name)
        record, previous = _run_one(model, p, feeds if previous is not None else None, previous, explain)
        records.append(record)
    if progress:
        progress(len(passes), len(passes), "done")
    return PipelineResult(model, records, reference, previous, notes)


def _reference_outputs(model: Model, feeds, notes: list[str]):
    if feeds is None:
        return None
    try:
        return verify.run(model, feeds)
    except GraphoptError as exc:
        notes.append(f"per-pass numeric checks are off: the input model does not run in onnxruntime ({exc})")
        return None


def _run_one(model: Model, p: Pass, feeds, previous, explain: bool) -> tuple[PassRecord, Any]:
    snapshot = model.ir.clone()
    near_misses = p.near_misses(model.ir) if explain else []
    start = time.perf_counter()
    try:
        rewrites = p(model.ir)
    except Exception as exc:  # a pass bug must not take the user's model down with it
        logger.warning("pass %s raised %s: %s; rolled back", p.name, type(exc).__name__, exc)
        logger.debug("traceback of pass %s", p.name, exc_info=True)
        model.ir = snapshot
        return PassRecord(p.name, str(p.kind), {}, time.perf_counter() - start, "failed",
                          note=f"raised {type(exc).__name__}: {exc}; rolled back", near_misses=near_misses), previous
    seconds = time.perf_counter() - start
    status = "applied" if sum(rewrites.values()) else "no-op"
    record = PassRecord(p.name, str(p.kind), rewrites, seconds, status, near_misses=near_misses)
    if feeds is None:
        return record, previous
    try:
        outputs = verify.run(model, feeds)
    except GraphoptError as exc:
        model.ir = snapshot
        record.status, record.note = "rolled-back", f"the rewritten model does not run: {exc}"
        record.check = {"passed": False, "error": str(exc)}
        return record, previous
    checks = verify.compare_outputs(previous, outputs)
    passed = all(c.passed for c in checks)
    record.check = {
        "passed": passed,
        "max_abs_error": max((c.max_abs_error for c in checks), default=0.0),
        "min_cosine": min((c.cosine for c in checks), default=1.0),
        "failed_outputs": [c.name for c in checks if not c.passed],
    }
    if not passed and p.kind == PassKind.EXACT:
        model.ir = snapshot
        record.status = "rolled-back"
        record.note = f"outputs diverged beyond tolerance ({', '.join(record.check['failed_outputs'])}); rolled back"
        logger.warning("pass %s diverged; rolled back", p.name)
        return record, previous
    return record, outputs

