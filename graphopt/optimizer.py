"""`optimize`: resolve passes, run the pipeline with numeric checks, validate, report."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from graphopt import importers, presets, summary, verify
from graphopt.errors import InputError
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
    mixer: str | None = None,
    layers: str | Sequence[int] = "all",
    fidelity: float = 0.99,
    calib: Any = None,
    calib_steps: int = 300,
) -> OptimizeResult:
    """Optimize a copy of `model` (anything `graphopt.load` accepts); the input is left unchanged.

    preset/passes: a preset name, or an explicit ordered list of pass names.
    inputs: None (seeded generated inputs), an `.npz` path, or a dict of arrays; used
    by the per-pass checks and the final validation when `validate` is True.
    target: "ort-cpu" or "ort-cuda": after the passes, lower for that onnxruntime provider,
    choosing per op kind the lowering measured fastest on these inputs (cached on disk
    unless `use_cache` is False); the choice and its timings are in `report.lowering`.
    preset "mixers" (approximate): after the exact passes, swap attention layers for `mixer`
    (linear:elu|relu|hedgehog|performer, pool, drop) on `layers` ("all", "auto" or indices),
    calibrated on `calib` (.npz, arrays, batches or a callable; generated with a warning when
    None) for `calib_steps` steps; `report.fidelity` holds the measured fidelity, and the final
    validation is replaced by it (the function changed on purpose).
    """
    source = importers.load(model)
    work = source.clone()
    names = presets.resolve(preset, passes)
    approximate = not passes and (preset or presets.DEFAULT) in presets.APPROXIMATE
    if approximate and not mixer:
        raise InputError(f"preset '{preset}' needs a mixer", hint="pass --mixer, e.g. --mixer linear:hedgehog")
    feeds = source_desc = None
    if validate or target:
        feeds, source_desc = verify.resolve_inputs(work, inputs, seed=seed, dims=dims)
    checked = feeds if validate else None
    result = run_pipeline(work, names, feeds=checked, explain=explain, progress=progress)
    fidelity_report = None
    if approximate:
        from graphopt.mixing import swap_mixers
        from graphopt.pipeline import PassRecord

        start = time.perf_counter()
        mixed = swap_mixers(work, mixer, calib=calib, layers=layers, fidelity=fidelity, steps=calib_steps, seed=seed,
                            dims=dims)
        work.ir = mixed.model.ir
        fidelity_report = mixed.report
        if feeds is not None:  # a KV cache that became a state changes the inputs
            feeds = mixed.feeds_for(feeds)
            checked = feeds if validate else None
        worst = min((v["mean_cosine"] for v in mixed.report["end_to_end"].values()), default=1.0)
        result.records.append(PassRecord("swap-mixers", "approximate", {"SwapMixer": len(mixed.report["layers_swapped"])},
                                         time.perf_counter() - start, "applied" if mixed.report["layers_swapped"] else "no-op",
                                         check={"passed": True, "min_cosine": worst}))
        result = dataclasses.replace(result, final_outputs=None, reference_outputs=None)
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
        notes=result.notes + _input_notes(validate, inputs) + (
            ["approximate preset: outputs are compared by the fidelity report, not validated as equal"] if approximate else []),
        lowering=lowering,
        fidelity=fidelity_report,
    )
    return OptimizeResult(work, report)


def _input_notes(validate: bool, inputs: Any) -> list[str]:
    if not validate:
        return ["numeric validation was off (--no-validate): nothing checked that the output computes the same function"]
    if inputs is None:
        return ["checked on generated inputs; pass --inputs data.npz to check on real data"]
    return []
