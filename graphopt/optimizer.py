"""`optimize`: build the plan from the request, run it, validate, report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphopt import budget as budget_mod, calibration, feeds as feeds_mod, fitting, headline, importers, model as model_mod, plan as plan_mod, presets, registry, runtimes, summary, verify
from graphopt.errors import GraphoptError, InputError
from graphopt.model import Model
from graphopt.plan import Progress
from graphopt.report import Report
from graphopt.steps import Options

PORTABLE = "make-portable"  # the finishing pass that writes standard ONNX only
STANDARD_CONTRIB = "standardize-contrib-ops"  # before it, unless an onnxruntime target wants contrib ops


@dataclasses.dataclass
class OptimizeResult:
    model: Model
    report: Report
    source: Model | None = None  # the model as given (what `measure` times against)
    feeds: Mapping[str, np.ndarray] | None = None  # the inputs the checks ran on

    def measure(self, feeds: Mapping[str, np.ndarray] | None = None, rounds: int = headline.ROUNDS) -> dict[str, Any]:
        """Time the model as given (a default onnxruntime session) against the optimized one (where
        it is meant to run), interleaved on `feeds` (default: the inputs the checks ran on); the
        report's headline then opens with the speed-up. Returns the headline's fields."""
        feeds = self.feeds if feeds is None else feeds
        if feeds is None or self.source is None:
            raise InputError("nothing to time on: optimize ran without inputs", hint="pass feeds to measure()")
        self.report.timing = headline.measure(self.source, self.model, feeds, rounds=rounds)
        return self.report.to_dict()["result"]

    @property
    def passed(self) -> bool:
        """False only when the final validation ran and failed."""
        return self.report.validation is None or self.report.validation.passed

    def session(self, **options: Any) -> runtimes.Executable:
        """Something with `run(feeds) -> {output: array}` in the runtime the model was made for
        (what `target` chose: onnxruntime or OpenVINO, at its precision); `graphopt.session(path)`
        does the same for a saved file. `options`: `threads`, `provider` (onnxruntime)."""
        return runtimes.executable_for(self.model, **options)


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
    fidelity: float = 0.99,
    calib: Any = None,
    calib_rows: int = calibration.DEFAULT_ROWS,
    portable: bool = False,
    precision: str | None = None,
    check_every: int = 1,
    step_progress: Callable[[int, int, str], None] | None = None,
    allow_unchecked: bool = False,
    approx: str | None = None,
    **step_options: Any,
) -> OptimizeResult:
    """Optimize a copy of `model` (anything `graphopt.load` accepts); the input is left unchanged.

    preset/passes: a preset name, or an explicit ordered list of pass names.
    inputs: None (seeded generated inputs), an `.npz` path, or a dict of arrays; used
    by the per-step checks and the final validation when `validate` is True.
    check_every: exact steps that changed the model are checked in groups of this many, a group
    rolled back as a whole if it diverges (0: one check of all of them, plus the final
    validation); a step that changed nothing is never run again. Each record says its group.
    target: "ort-cpu" or "ort-cuda": after the passes, lower for that onnxruntime provider,
    choosing per op kind the lowering measured fastest on these inputs (cached on disk
    unless `use_cache` is False); the choice and its timings are in `report.lowering`.
    "cpu": the runtime measured fastest on this machine (onnxruntime or OpenVINO; below fp32
    only with `precision` "bf16" / "fp16" / "auto" and within `fidelity`); its output is portable.
    portable: write standard ONNX only (graphopt functions inlined; contrib ops appear only for
    the ORT targets), loadable by any ONNX consumer.
    mixer (approximate; preset "mixers" asks for one): after the exact passes, swap attention
    layers for `mixer` (see `graphopt passes`), calibrated on `calib` (.npz, arrays, batches or
    a callable; generated with a warning when None), `fidelity` the end-to-end cosine bound;
    `report.fidelity` holds the measured fidelity, and the final validation is replaced by it
    (the function changed on purpose).
    calib_rows: how many rows of each activation a calibrating step keeps while the calibration
    batches stream through it (int8's ranges and errors, pruning's refits): the activations
    held do not grow with the number of examples.
    step_options: the options the registered approximate steps and targets declare
    (`graphopt.registry.step_options()`; e.g. the mixer's `layers`, `calib_steps`, `max_window`,
    `features`), each documented where it is declared and shown by `graphopt optimize --help`.
    step_progress: (done, total, what) from inside a long step (a mixer's fit, layer by layer).
    approx: the approximate families allowed under one fidelity budget, comma-separated from
    prune, int8, bf16, mixers, or auto (prune and int8): `fidelity` then bounds the whole plan's
    end-to-end output against the model before the first approximate step, each step keeping
    its share (graphopt/budget.py); the report's notes give each family's part of the error.
    allow_unchecked: when no input can be generated or found that the model runs on (or the
    given inputs do not run it), optimize without numeric checks instead of raising
    InputError; every step is still checked to load, and the report says what was not checked.
    """
    source = importers.load(model)
    work = source.clone()
    names = presets.resolve(preset, passes)
    required = None if passes else presets.APPROXIMATE.get(preset or presets.DEFAULT)
    # Approximate steps other families register (prune=...) come in through **step_options too;
    # they run before the mixer swap and reduced precision (smaller matrices are quantized after).
    asked = {k: step_options.pop(k) for k in list(step_options) if k in registry.approximate_options()}
    requests = {**asked, "mixer": mixer, "precision": precision}
    allowed = budget_mod.families(approx)
    if allowed:
        requests = budget_mod.requests(allowed, requests, target)
        precision = requests["precision"]
    if required and not requests.get(required):
        raise InputError(f"preset '{preset}' needs a {required}", hint="pass --mixer, e.g. --mixer linear:hedgehog")
    if precision is not None and precision not in registry.choices("precision"):
        raise InputError(f"unknown precision '{precision}'", hint=f"choose from {', '.join(registry.choices('precision'))}")
    declared = {option.name: option for _, option in registry.step_options()}
    unknown = sorted(set(step_options) - set(declared))
    if unknown:
        raise InputError(f"optimize() got unknown option(s) {', '.join(unknown)}",
                         hint=f"options the registered steps declare: {', '.join(sorted(declared))}")
    for name, value in step_options.items():
        allowed_values = declared[name].choices() if declared[name].choices else None
        if allowed_values is not None and value not in allowed_values:
            raise InputError(f"unknown {name} '{value}'", hint=f"choose from {', '.join(allowed_values)}")
    options = Options(seed=seed, dims=dims, fidelity=fidelity, calib=calib, calib_rows=calib_rows, use_cache=use_cache, precision=precision,
                      target=target, progress=step_progress, step=dict(step_options))
    shared = budget_mod.Budget(fidelity, 0) if allowed else None
    plan = plan_mod.build(names, approximate=requests, target=target, options=options,
                          finish=_portable_passes(target) if portable else [], budget=shared)
    feeds = source_desc = reference = None
    unchecked: list[str] = []
    if check_every < 0:
        raise InputError(f"check_every must be >= 0, got {check_every}", hint="1: every step; 0: once, at the end")
    if validate or target:
        try:
            if inputs is None:  # generated: sizes (and branch selectors) the model runs at
                found = fitting.fit(work, verify.run, seed=seed, dims=dims)
                feeds, reference, source_desc = found.feeds, found.outputs if validate else None, found.describe(seed)
            else:
                feeds, source_desc = verify.resolve_inputs(work, inputs, seed=seed, dims=dims)
        except (feeds_mod.CannotGenerate, fitting.NoFittingInputs) as exc:
            if target or not allow_unchecked:
                raise
            unchecked.append(f"not checked numerically (--allow-unchecked): {exc}".rstrip("."))
    result = plan.run(work, feeds=feeds, check=validate, explain=explain, progress=progress, check_every=check_every,
                      reference=reference, allow_unchecked=allow_unchecked)
    _check_loads(result)
    validation = None
    if result.reference_outputs is not None and not result.approximate:
        checks = verify.compare_outputs(result.reference_outputs, result.final_outputs)
        validation = verify.Validation(checks, feeds_mod.shapes(feeds), source_desc,
                                       seed if inputs is None else None)
    report = Report(
        preset=None if passes else (preset or presets.DEFAULT),
        steps=result.records,
        validation=validation,
        before=summary.summarize(source),
        after=summary.summarize(result.model),
        notes=unchecked + _budget_notes(shared, allowed) + result.notes + _portable_notes(result.model, portable, target) + ([] if unchecked else _input_notes(validate, inputs)) + _precision_notes(precision, target) + (
            ["approximate steps ran: outputs are compared by the fidelity report, not validated as equal"]
            if result.approximate else []),
    )
    report.runtime, _ = runtimes.meant_for(result.model)
    report.precision = headline.precision_of(result.model)
    return OptimizeResult(result.model, report, source, feeds)


def _budget_notes(shared: budget_mod.Budget | None, allowed: tuple[str, ...]) -> list[str]:
    """The shared budget: which families it covered, and each step's part of the error."""
    if shared is None:
        return []
    lines = [f"one fidelity budget {shared.bound} for {', '.join(allowed)}: every approximate step measured end to end "
             "against the model before the first one, each within its share"]
    before = 1.0
    for name, worst, share in shared.spent:
        lines.append(f"{name}: end-to-end worst mean cosine {worst:.5f} (its share: >= {share:.5f}; "
                     f"its part of the error {max(before - worst, 0.0):.5f} of {1 - shared.bound:.5f})")
        before = worst
    return lines


def _portable_passes(target: str | None) -> list[str]:
    """Standard ONNX only; contrib ops stay only for the onnxruntime targets that chose them."""
    return [PORTABLE] if target and target.startswith("ort-") else [STANDARD_CONTRIB, PORTABLE]


def _check_loads(result: plan_mod.PlanResult) -> None:
    """Nothing invalid leaves: the output passes onnx.checker (where the input does) and, when
    no numbers were compared (where a run would have loaded it), loads in onnxruntime. Every
    step was checked so already; this is the last line, and failing it is a graphopt bug."""
    meant_for_ort = result.model.ir.metadata_props.get(model_mod.RUNTIME_KEY, "onnxruntime") == "onnxruntime"
    runtime = result.reference_outputs is None and not result.approximate and meant_for_ort
    if problem := verify.load_problem(result.model, runtime=runtime, checker=result.checker):
        raise GraphoptError(f"the optimized model does not load ({problem}); nothing was written",
                            hint="rerun with --debug and report it, or pick passes with --passes to avoid the one that broke it")


def _portable_notes(model: Model, portable: bool, target: str | None) -> list[str]:
    if not (portable or target == "cpu") or (target or "").startswith("ort-"):
        return []
    note = summary.nonstandard_note(model.ir)
    return [note] if note else []


def _precision_notes(precision: str | None, target: str | None) -> list[str]:
    if precision == "bf16" and target != "cpu":
        return ["a bf16 graph runs in OpenVINO, TVM and GPU runtimes; onnxruntime's CPU provider has no bf16 kernels"]
    return []


def _input_notes(validate: bool, inputs: Any) -> list[str]:
    if not validate:
        return ["numeric validation was off (--no-validate): nothing checked that the output computes the same function"]
    if inputs is None:
        return ["checked on generated inputs; pass --inputs data.npz to check on real data"]
    return []
