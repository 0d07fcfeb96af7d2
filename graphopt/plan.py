"""A plan is an ordered list of steps (graphopt/steps.py); `build` makes one from what the user
asked, `Plan.run` runs it. Composition is data: exact passes by name from the registry, then
the approximate steps the request names (each registered by the option that asks for it:
`mixer`, later `precision`), then the lowering step registered for the target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphopt import model as model_mod, registry, verify
from graphopt.errors import GraphoptError, InputError
from graphopt.budget import Budget
from graphopt.model import Model
from graphopt.steps import ExactStep, Options, Stage, Step, StepRecord

Progress = Callable[[int, int, str], None]  # (index, total, step name)


@dataclasses.dataclass
class PlanResult:
    model: Model
    records: list[StepRecord]
    reference_outputs: dict[str, np.ndarray] | None  # the input model's outputs on the check feeds
    final_outputs: dict[str, np.ndarray] | None
    feeds: dict[str, np.ndarray] | None  # the check feeds, as the final model takes them
    approximate: bool  # an approximate step ran: the final model is compared by fidelity
    notes: list[str]
    checker: bool = True  # the input passes onnx.checker's full check, so the output must too


@dataclasses.dataclass
class Plan:
    steps: list[Step]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def run(self, model: Model, *, feeds: Mapping[str, np.ndarray] | None = None, check: bool = True,
            explain: bool = False, progress: Progress | None = None, check_every: int = 1,
            reference: Mapping[str, np.ndarray] | None = None, allow_unchecked: bool = False) -> PlanResult:
        """Run every step on `model` in place. `feeds`: inputs for the checks (with `check`) and
        for the lowering measurements; without them nothing is checked. `reference`: the
        model's outputs on `feeds`, when the caller has run it already. A model that does not
        run on `feeds` is an InputError, unless `allow_unchecked` (then nothing is compared,
        and a note says so). `check_every`: exact steps that changed the model are checked in
        groups of this many (0: one group, checked before the first approximate or lowering
        step and at the end); steps that changed nothing are not run again. Every step that
        changed the model must still load (onnx.checker, and onnxruntime where numbers are
        not compared), or it is rolled back."""
        notes: list[str] = []
        if reference is None and feeds is not None and check:
            reference = _reference_outputs(model, feeds, notes, allow_unchecked)
        if given_problem := verify.load_problem(model, runtime=False):
            notes.append(f"the input model does not pass onnx.checker ({given_problem}): steps are kept if they load "
                         "in onnxruntime, not checked against onnx.checker")
        stage = Stage(model, dict(feeds) if feeds is not None else None, reference, explain, given=model.clone(),
                      check_every=check_every, mapped=model_mod.mapped_tensors(model.ir), checker=given_problem is None)
        records = []
        for index, step in enumerate(self.steps):
            if progress:
                progress(index, len(self.steps), step.name)
            stage.unmap()  # a step that makes new weights does not also hold the old ones it reads
            records.append(step.run(stage))
        stage.settle()
        stage.unmap()  # what is saved next is copied file to file
        if progress:
            progress(len(self.steps), len(self.steps), "done")
        return PlanResult(stage.model, records, reference, stage.outputs, stage.feeds, stage.approximate, notes,
                          stage.checker)


def build(pass_names: Sequence[str], *, approximate: Mapping[str, Any] | None = None, target: str | None = None,
          options: Options | None = None, finish: Sequence[str] = (), budget: Budget | None = None) -> Plan:
    """Exact (or structural) passes in order, then an approximate step per non-empty request
    (`{"mixer": "linear:hedgehog"}`), then the lowering for `target`, then the `finish` passes
    (make-portable). With a `budget` (graphopt/budget.py) the approximate steps share one bound:
    each gets its share as its `fidelity` and measures against the same reference. Unknown
    names raise `InputError` before any work."""
    options = options or Options()
    steps: list[Step] = [ExactStep(registry.get(name)) for name in pass_names]
    approximate_steps = []
    for option, value in (approximate or {}).items():
        step = registry.approximate_step(option)(value, options) if value else None
        if step is not None:  # a value the lowering reads instead (precision bf16 under --target cpu)
            steps.append(step)
            approximate_steps.append(step)
    if budget is not None:
        budget.steps = len(approximate_steps)
        for position, step in enumerate(approximate_steps):
            step.options = dataclasses.replace(step.options, fidelity=budget.share(position), budget=budget)
    if target:
        steps.append(registry.lowering_step(target)(target, options))
    steps.extend(ExactStep(registry.get(name)) for name in finish)
    return Plan(steps)


def _reference_outputs(model: Model, feeds, notes: list[str], allow_unchecked: bool):
    try:
        return verify.run(model, feeds)
    except GraphoptError as exc:
        if not allow_unchecked:
            raise InputError(f"the model does not run on these inputs, so no step could be checked: {exc}".rstrip("."),
                             hint="pass inputs it runs on (--inputs data.npz or --dims), or --allow-unchecked "
                                  "to write the output without numeric checks") from None
        notes.append(f"not checked numerically (--allow-unchecked): the input model does not run in onnxruntime ({exc})")
        return None
