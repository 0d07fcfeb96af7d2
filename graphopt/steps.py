"""The step contract: every step of a plan is exact, approximate or lowering, and its kind
decides its check.

- exact (`ExactStep`, one registered pass): checked equal to the stage before on the check
  feeds; a pass that diverges, makes the model unrunnable or raises is rolled back.
- approximate (`ApproximateStep`: mixer swaps, reduced precision): calibrated on the user's
  data, its fidelity measured against the user's bound (kept or reverted per layer inside the
  step); the record carries its per-layer and end-to-end fidelity. Later exact steps are
  checked against the approximate model, and the final validation is replaced by fidelity.
- lowering (`LoweringStep`): candidates measured on the target, the fastest kept, then the
  result checked equal to the stage before (rolled back if not).

Every step returns one `StepRecord`, the report's one record shape. Steps read and update a
`Stage`: the model, the check feeds and the outputs the next exact step must reproduce.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphopt import calibration, fidelity, model as model_mod, verify
from graphopt.details import Details
from graphopt.errors import GraphoptError
from graphopt.ir import ir
from graphopt.model import Model, fingerprint
from graphopt.rewrite import Pass, PassKind

logger = logging.getLogger(__name__)

StepKind = PassKind  # one vocabulary for passes and steps: exact, approximate, lowering
Feeds = Mapping[str, np.ndarray]


@dataclasses.dataclass
class StepRecord:
    """What one step did. `check`: the numeric check of its kind (equality for exact and
    lowering, the fidelity bound for approximate); `fidelity`: an approximate step's
    measurements; `measurements`: a lowering step's candidates and choice (both kept for readers
    of report schema 2); `details`: the same, as tables and lines (graphopt/details.py)."""

    name: str
    kind: str
    rewrites: dict[str, int]
    seconds: float
    status: str  # "applied", "no-op", "rolled-back", "failed"
    check: dict[str, Any] | None = None
    note: str = ""
    near_misses: list[str] = dataclasses.field(default_factory=list)
    fidelity: dict[str, Any] | None = None
    measurements: dict[str, Any] | None = None
    details: Details | None = None  # what the step measured, in the declared shapes the renderers draw

    @property
    def total_rewrites(self) -> int:
        return sum(self.rewrites.values())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



@dataclasses.dataclass
class Options:
    """What `optimize` was asked, for the steps that need more than the model: calibration
    data, the fidelity bound, seeds and dims, the lowering cache, the target; and the options
    the approximate steps and targets declared (`StepOption`, registered with them), in `step`
    and read as attributes (`options.max_window`), their declared default when not given."""

    seed: int = 0
    dims: Mapping[str, int] | None = None
    fidelity: float = 0.99
    calib: Any = None
    calib_rows: int = calibration.DEFAULT_ROWS  # rows of each activation a step keeps while it streams calibration (calibration.sample_rows)
    use_cache: bool = True
    precision: str | None = None  # reduced precision the user allows (fp32, bf16, fp16, auto); None: fp32 only
    target: str | None = None  # the lowering target, for steps whose form depends on it
    progress: Callable[[int, int, str], None] | None = None  # a step's own progress (done, total, what)
    step: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # registered step options by name
    budget: Any = None  # graphopt.budget.Budget when the plan shares one bound; `fidelity` is then this step's share

    def reference_for(self, model: Model) -> Model:
        """The model an approximate step measures its fidelity against: its own input, or under
        a shared budget the model before the plan's first approximate step."""
        return self.budget.reference if self.budget is not None and self.budget.reference is not None else model

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "step":
            raise AttributeError(name)
        from graphopt import registry  # a declared step option: given, else its default

        declared = registry.step_option(name)
        return self.step.get(name, declared.default)


@dataclasses.dataclass(frozen=True)
class StepOption:
    """An option an approximate step or a target declares: `optimize(name=...)`, the CLI flag
    `--name-with-dashes`, and `options.name` inside the step, from this one declaration."""

    name: str
    default: Any
    help: str
    parse: Callable[[str], Any] | None = None  # the CLI value's type (int, float; None: text)
    choices: Callable[[], Sequence[str]] | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclasses.dataclass
class Stage:
    """The state a plan threads through its steps. `feeds`: inputs for checks and
    measurements (None when there are none); `outputs`: the current function's outputs on
    `feeds`, which the next exact or lowering step must reproduce (None: checks are off)."""

    model: Model
    feeds: dict[str, np.ndarray] | None
    outputs: dict[str, np.ndarray] | None
    explain: bool = False
    approximate: bool = False  # an approximate step changed the function on purpose
    given: Model | None = None  # the plan's input as given (a lowering may find it faster than the rewrite)
    check_every: int = 1  # exact steps that changed the model are checked in groups of this many (0: once, at the end)
    pending: list = dataclasses.field(default_factory=list)  # (record, snapshot before it) not yet checked
    mapped: list = dataclasses.field(default_factory=list)  # the input's memory-mapped weights (model.mapped_tensors)
    checker: bool = True  # onnx.checker's full check holds for the input, so every step must keep it

    def load_problem(self, *, runtime: bool) -> str | None:
        """Why the stage's model would not load (onnx.checker where the input passes it; with
        `runtime`, an onnxruntime session), or None. Run after every step that changed the
        model, so that nothing invalid is kept, whether or not its numbers can be compared."""
        if not self.checker and not runtime:
            return None
        return verify.load_problem(self.model, runtime=runtime, checker=self.checker)

    def unmap(self, *, live: bool = True) -> None:
        """Weights held once: close the maps of the input's weights no model of the stage reads
        any more (a rewrite replaced them), and with `live` of all of them, so that a rewrite
        making new weights does not hold the ones it reads twice (a mapped tensor read again
        maps again, from the page cache)."""
        model_mod.unmap(self.mapped, keep=None if live else self.model.ir)

    def run(self) -> dict[str, np.ndarray]:
        return verify.run(self.model, self.feeds)

    def settle(self) -> None:
        """Check the exact steps not yet checked, as one group: on divergence the model goes
        back to before the group's first step, and each step of the group says so."""
        if not self.pending:
            return
        group, self.pending = self.pending, []
        first, snapshot = group[0]
        names = [r.name for r, _ in group]
        check_equal(self, first, snapshot)  # restores `snapshot` on divergence
        failed = first.status == "rolled-back"
        for record, _ in group:
            record.check = {**first.check, "group": names}
            if failed:
                record.status = "rolled-back"
                record.note = f"checked as one group ({', '.join(names)}): {first.note.split('; rolled back')[0]}; rolled back"


class Step(abc.ABC):
    name: str
    kind: StepKind

    @abc.abstractmethod
    def run(self, stage: Stage) -> StepRecord:
        """Transform `stage.model` in place (or replace it), check it by this step's kind."""


class ExactStep(Step):
    """One registered pass, checked equal to the stage before and rolled back if not (passes
    of the approximate kind are kept, with their error recorded)."""

    def __init__(self, p: Pass) -> None:
        self.p, self.name, self.kind = p, p.name, p.kind

    def run(self, stage: Stage) -> StepRecord:
        model, p = stage.model, self.p
        snapshot = model.ir.clone()
        before = fingerprint(model.ir)
        near_misses = p.near_misses(model.ir) if stage.explain else []
        start = time.perf_counter()
        try:
            rewrites = p(model.ir)
        except Exception as exc:  # a pass bug must not take the user's model down with it
            logger.warning("pass %s raised %s: %s; rolled back", p.name, type(exc).__name__, exc)
            logger.debug("traceback of pass %s", p.name, exc_info=True)
            model.ir = snapshot
            return StepRecord(p.name, str(p.kind), {}, time.perf_counter() - start, "failed",
                              note=f"raised {type(exc).__name__}: {exc}; rolled back", near_misses=near_misses)
        record = StepRecord(p.name, str(p.kind), rewrites, time.perf_counter() - start,
                            "applied" if sum(rewrites.values()) else "no-op", near_misses=near_misses)
        stage.unmap(live=False)
        if not sum(rewrites.values()) and fingerprint(model.ir) == before:
            if stage.outputs is not None:
                record.check = {"skipped": "the pass changed nothing"}
            return record
        if problem := stage.load_problem(runtime=stage.outputs is None):  # a numeric check loads it in onnxruntime
            model.ir = snapshot
            record.status, record.note = "rolled-back", f"the rewritten model does not load: {problem}; rolled back"
            record.check = {"passed": False, "error": problem}
            logger.warning("step %s made a model that does not load (%s); rolled back", p.name, problem)
            return record
        if stage.outputs is None:
            return record
        exact = p.kind != PassKind.APPROXIMATE
        if not exact or stage.check_every == 1:
            stage.settle()
            return check_equal(stage, record, snapshot, rollback=exact)
        stage.pending.append((record, snapshot if not stage.pending else None))
        if stage.check_every and len(stage.pending) >= stage.check_every:
            stage.settle()
        return record


QUANTIZED_EQUAL_COSINE = 1 - 1e-5


def _quantized(model: ir.Model) -> bool:
    nodes = itertools.chain(ir.traversal.RecursiveGraphIterator(model.graph), *model.functions.values())
    return any(n.op_type == "QuantizeLinear" for n in nodes)


def check_equal(stage: Stage, record: StepRecord, snapshot, *, rollback: bool = True) -> StepRecord:
    """Run the stage's model on its feeds and compare with the stage before: on divergence
    (with `rollback`) or when it no longer runs, restore `snapshot` and say why."""
    try:
        outputs = stage.run()
    except GraphoptError as exc:
        stage.model.ir = snapshot
        record.status, record.note = "rolled-back", f"the rewritten model does not run: {exc}"
        record.check = {"passed": False, "error": str(exc)}
        return record
    checks = verify.compare_outputs(stage.outputs, outputs)
    passed = all(c.passed for c in checks)
    record.check = {
        "passed": passed,
        "max_abs_error": max((c.max_abs_error for c in checks), default=0.0),
        "min_cosine": min((c.cosine for c in checks), default=1.0),
        "failed_outputs": [c.name for c in checks if not c.passed],
    }
    if not passed and _quantized(snapshot) and record.check["min_cosine"] >= QUANTIZED_EQUAL_COSINE \
            and all(np.isfinite(c.max_abs_error) for c in checks):  # a missing or misshapen output never passes
        # A float-exact rewrite ahead of a QuantizeLinear can still flip a rounding (a GEMM
        # summed in another order lands on the other side of a step): equal, by the cosine.
        record.check.update(passed=True, failed_outputs=[], criterion=(
            f"the model is quantized: float-level differences flip roundings, so equal means min cosine >= "
            f"{QUANTIZED_EQUAL_COSINE}"))
        passed = True
    if not passed and rollback:
        stage.model.ir = snapshot
        record.status = "rolled-back"
        record.note = f"outputs diverged beyond tolerance ({', '.join(record.check['failed_outputs'])}); rolled back"
        logger.warning("step %s diverged; rolled back", record.name)
        return record
    stage.outputs = outputs
    return record


@dataclasses.dataclass
class Approximation:
    """What an approximate step made: the new model, its rewrites, its fidelity report (with
    "end_to_end": {output: {"mean_cosine", "min_cosine", ...}}), and, when the step changed
    the model's inputs (a KV cache became a state), how to convert the old inputs."""

    model: Model
    rewrites: dict[str, int]
    fidelity: dict[str, Any]
    convert_feeds: Callable[[Feeds], dict[str, np.ndarray]] | None = None  # old inputs -> the new model's


class ApproximateStep(Step):
    """Calibrate, change the function, measure how far it moved against `bound`."""

    kind = PassKind.APPROXIMATE

    def __init__(self, options: Options) -> None:
        self.options = options

    @abc.abstractmethod
    def approximate(self, model: Model) -> Approximation:
        """Calibrate on `self.options.calib` and return the changed model with its fidelity."""

    def run(self, stage: Stage) -> StepRecord:
        stage.settle()
        start = time.perf_counter()
        if self.options.budget is not None and self.options.budget.reference is None:
            self.options.budget.reference = stage.model.clone()  # what the whole budget is measured against
        made = self.approximate(stage.model)
        if stage.checker and (problem := verify.load_problem(made.model, runtime=False)):  # made on a copy: nothing to undo
            return StepRecord(self.name, str(self.kind), {}, time.perf_counter() - start, "rolled-back",
                              check={"passed": False, "error": problem},
                              note=f"the approximate model does not load: {problem}; rolled back")
        stage.model.ir = made.model.ir
        stage.approximate = True
        if stage.feeds is not None and made.convert_feeds is not None:
            stage.feeds = made.convert_feeds(stage.feeds)
        if stage.outputs is not None:  # later steps are checked against the approximate model
            try:
                stage.outputs = stage.run()
            except GraphoptError:  # e.g. a bf16 graph: onnxruntime's CPU provider has no kernels for it
                stage.outputs = None
        worst = fidelity.worst_mean_cosine(made.fidelity.get("end_to_end", {}))
        bound = self.options.fidelity
        if self.options.budget is not None:
            self.options.budget.spent.append((self.name, worst, bound))
        return StepRecord(self.name, str(self.kind), made.rewrites, time.perf_counter() - start,
                          "applied" if sum(made.rewrites.values()) else "no-op",
                          check={"passed": worst >= bound, "min_cosine": worst, "bound": bound}, fidelity=made.fidelity,
                          details=self.details(made.fidelity))

    def details(self, fidelity: dict[str, Any]) -> Details | None:
        """The step's report as tables and lines (graphopt/details.py); by default end to end only."""
        return Details(end_to_end=dict(fidelity.get("end_to_end", {})), bound=self.options.fidelity)


@dataclasses.dataclass
class Lowering:
    """A lowering step's choice: the passes that write it, session settings to record in the
    model (`annotate`), and what was measured (candidates, timings, the choice)."""

    passes: Sequence[Pass]
    measurements: dict[str, Any]
    annotate: Callable[[Model], None] | None = None
    replace: Model | None = None  # measured faster than any lowering of the stage: use it instead (same function)
    # A candidate that changes the arithmetic on purpose (a bf16 graph): applied after `passes`;
    # its fidelity, measured in the target runtime against the bound, replaces the equality check.
    convert_model: Callable[[Model], Model] | None = None
    fidelity: dict[str, Any] | None = None


class LoweringStep(Step):
    """Measure candidates on the target, keep the fastest, check the result equal."""

    kind = PassKind.LOWERING

    def __init__(self, target: str, options: Options) -> None:
        self.target, self.options, self.name = target, options, f"lower-{target}"

    def details(self, measurements: dict[str, Any]) -> Details | None:
        """The candidates measured and the one chosen, as tables (graphopt/details.py)."""
        return None

    @abc.abstractmethod
    def choose(self, stage: Stage) -> Lowering:
        """Measure the candidates on `stage.feeds` and return the fastest."""

    def run(self, stage: Stage) -> StepRecord:
        stage.settle()
        start = time.perf_counter()
        snapshot = stage.model.ir.clone()
        choice = self.choose(stage)
        rewrites: dict[str, int] = {}
        note = ""
        if choice.replace is not None:
            stage.model.ir = choice.replace.clone().ir
            rewrites, note = {"KeepInputAsGiven": 1}, "the input as given ran faster on the target than the rewritten model"
        for p in choice.passes:
            for rule, n in p(stage.model.ir).items():
                rewrites[rule] = rewrites.get(rule, 0) + n
        if choice.convert_model is not None:
            stage.model.ir = choice.convert_model(stage.model).ir
            rewrites["ConvertPrecision"] = 1
        if choice.annotate is not None:
            choice.annotate(stage.model)
        record = StepRecord(self.name, str(self.kind), rewrites, time.perf_counter() - start,
                            "applied" if sum(rewrites.values()) else "no-op", measurements=choice.measurements, note=note,
                            details=self.details(choice.measurements))
        if choice.convert_model is not None:  # approximate on purpose: checked by its measured fidelity
            record.check = {"passed": True, **(choice.fidelity or {})}
            stage.approximate, stage.outputs = True, None
            return record
        if stage.outputs is None:
            if problem := stage.load_problem(runtime=False):  # the target may not be onnxruntime's CPU provider
                stage.model.ir = snapshot
                record.status, record.note = "rolled-back", f"the lowered model does not load: {problem}; rolled back"
                record.check = {"passed": False, "error": problem}
            return record
        return check_equal(stage, record, snapshot)
