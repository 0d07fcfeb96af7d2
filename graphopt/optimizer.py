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
    target: str | None = None,
    use_cache: bool = True,
) -> OptimizeResult:
    """Optimize a copy of `model` (anything `graphopt.load` accepts); the input is left unchanged.

    preset/passes: a preset name, or an explicit ordered list of pass names.
    inputs: None (seeded generated inputs), an `.npz` path, or a dict of arrays; used
    by the per-pass checks and the final validation when `validate` is True.
    target: "ort-cpu" or "ort-cuda": after the passes, lower for that onnxruntime provider,
    choosing per op kind the lowering measured fastest on these inputs (cached on disk
    unless `use_cache` is False); the choice and its timings are in `report.lowering`.
    """
    source = importers.load(model)
    work = source.clone()
    names = presets.resolve(preset, passes)
    feeds = source_desc = None
    if validate or target:
        feeds, source_desc = verify.resolve_inputs(work, inputs, seed=seed, dims=dims)
    checked = feeds if validate else None
    result = run_pipeline(work, names, feeds=checked, explain=explain, progress=progress)
    lowering = None
    if target:
        from graphopt.backends import ort_select

        selection = ort_select.select(work.ir, feeds, target, use_cache=use_cache)
        lowered = run_pipeline(work, selection.passes, feeds=checked, explain=explain)
        ort_select.apply_metadata(work.ir, selection)
        result = dataclasses.replace(result, records=result.records + lowered.records, final_outputs=lowered.final_outputs)
        lowering = selection.to_dict()
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
        lowering=lowering,
    )
    return OptimizeResult(work, report)


def _input_notes(validate: bool, inputs: Any) -> list[str]:
    if not validate:
        return ["numeric validation was off (--no-validate): nothing checked that the output computes the same function"]
    if inputs is None:
        return ["checked on generated inputs; pass --inputs data.npz to check on real data"]
    return []
