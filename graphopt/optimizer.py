"""`optimize`: resolve passes, run the pipeline with numeric checks, validate, report."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from graphopt import importers, presets, summary, verify
from graphopt.model import Model
from graphopt.pipeline import Progress, run_pipeline
from graphopt.report import Report


@dataclasses.dataclass
class OptimizeResult:
    model: Model
    report: Report

    @property
    def passed(self) -> bool:
        """False only when the final validation ran and failed."""
        return self.report.validation is None or self.report.validation.passed


def optimize(
    model: Any,
    *,
    preset: str | None = presets.DEFAULT,
    passes: Sequence[str] | None = None,
    inputs: Any = None,
    validate: bool = True,
    explain: bool = False,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    progress: Progress | None = None,
) -> OptimizeResult:
    """Optimize a copy of `model` (anything `graphopt.load` accepts); the input is left unchanged.

    preset/passes: a preset name, or an explicit ordered list of pass names.
    inputs: None (seeded generated inputs), an `.npz` path, or a dict of arrays; used
    by the per-pass checks and the final validation when `validate` is True.
    """
    source = importers.load(model)
    work = source.clone()
    names = presets.resolve(preset, passes)
    feeds = source_desc = None
    if validate:
        feeds, source_desc = verify.resolve_inputs(work, inputs, seed=seed, dims=dims)
    result = run_pipeline(work, names, feeds=feeds, explain=explain, progress=progress)
    validation = None
    if result.reference_outputs is not None:
        checks = verify.compare_outputs(result.reference_outputs, result.final_outputs)
        validation = verify.Validation(checks, {k: list(v.shape) for k, v in feeds.items()}, source_desc,
                                       seed if inputs is None else None)
    report = Report(
        preset=None if passes else (preset or presets.DEFAULT),
        passes=result.records,
        validation=validation,
        before=summary.summarize(source),
        after=summary.summarize(work),
        notes=result.notes + _input_notes(validate, inputs),
    )
    return OptimizeResult(work, report)


def _input_notes(validate: bool, inputs: Any) -> list[str]:
    if not validate:
        return ["numeric validation was off (--no-validate): nothing checked that the output computes the same function"]
    if inputs is None:
        return ["checked on generated inputs; pass --inputs data.npz to check on real data"]
    return []
