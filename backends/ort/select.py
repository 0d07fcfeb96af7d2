"""Measured lowering for onnxruntime: per op kind, time the candidate lowerings on the
user's shapes and provider and keep the fastest.

Fused is not always faster: on a 2-core CPU onnxruntime's contrib SkipLayerNormalization
measured several times slower than the Add + LayerNormalization it replaces. So every
choice is timed, in one process, interleaved, and the choice and its timings go into the
report. Results are cached on disk (GRAPHOPT_CACHE_DIR, default ~/.cache/graphopt) keyed
by the model's structure (not its weights), the input shapes, the provider and the
onnxruntime version; a cached choice is re-applied without timing.

A candidate is a list of lowering passes, optionally plus onnxruntime graph transformers to
disable in the session; disabled transformers travel with the model in its metadata
(DISABLED_KEY) and graphopt's own runners (`graphopt bench`, `session_for`) apply them, but a
default session does not, so no built-in candidate uses them: the plain-norm candidate writes
its Add as Sum instead, which ORT's SkipLayerNormFusion does not match.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from graphopt import choices, exporters, registry, timing
from graphopt.details import Details, Table, columns
from graphopt.model import DISABLED_KEY
from graphopt.sessions import CPU, session_for
from graphopt.errors import BackendError, InputError
from graphopt.ir import ir
from graphopt.steps import Lowering, LoweringStep, Stage

TARGETS = {"ort-cpu": CPU, "ort-cuda": "CUDAExecutionProvider"}
TARGET_KEY = "graphopt.ort.target"
CACHE_VERSION = 1
CACHE_KIND = "ort-select"


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    passes: tuple[str, ...] = ()
    disabled: tuple[str, ...] = ()


# Per op kind, in the order tried; the first is the reference the others must beat.
CANDIDATES: dict[str, tuple[Candidate, ...]] = {
    "attention": (
        Candidate("decomposed"),  # the canonical op's body, inlined by onnxruntime
        Candidate("contrib-mha", ("lower-attention-mha",)),
        Candidate("contrib-attention", ("lower-attention-packed",)),
        Candidate("onnx-attention", ("lower-attention-onnx",)),
    ),
    "skip-norm": (
        # Add + norm kept plain by writing the Add as Sum, which ORT's SkipLayerNormFusion does not
        # match: no session option needed (a disabled transformer would be lost in a default session).
        Candidate("plain", ("lower-norm-input-sum",)),
        Candidate("contrib-skip-norm", ("lower-skip-norm",)),
    ),
}


@dataclasses.dataclass
class Selection:
    target: str
    provider: str
    choices: dict[str, str]  # op kind -> candidate name
    timings_ms: dict[str, dict[str, float]]  # op kind -> candidate -> median ms
    skipped: dict[str, str]  # op kind or candidate -> why it was not timed
    cached: bool = False
    cache_file: str | None = None

    @property
    def passes(self) -> list[str]:
        return [p for kind, name in self.choices.items() for p in _candidate(kind, name).passes]

    @property
    def disabled(self) -> list[str]:
        return sorted({d for kind, name in self.choices.items() for d in _candidate(kind, name).disabled})

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "provider": self.provider, "choices": self.choices, "timings_ms": self.timings_ms,
                "skipped": self.skipped, "passes": self.passes, "disabled_ort_optimizers": self.disabled,
                "cached": self.cached, "cache_file": self.cache_file}


def provider_for(target: str) -> str:
    if target not in TARGETS:
        raise InputError(f"unknown target '{target}'", hint=f"known targets: {', '.join(TARGETS)}")
    provider = TARGETS[target]
    if provider not in ort.get_available_providers():
        raise BackendError(f"target '{target}' needs onnxruntime's {provider}, which this onnxruntime does not have "
                           f"(available: {', '.join(ort.get_available_providers())})",
                           hint="install onnxruntime-gpu for ort-cuda, or use --target ort-cpu")
    return provider


def select(model: ir.Model, feeds: Mapping[str, np.ndarray], target: str = "ort-cpu", *, rounds: int = 15,
           use_cache: bool = True) -> Selection:
    """Time the candidates of each op kind on `feeds` and return the fastest per kind."""
    provider = provider_for(target)
    key = _cache_key(model, feeds, provider)
    cached = choices.read(CACHE_KIND, key) if use_cache else None
    if cached is not None and {"choices", "timings_ms", "skipped"} <= set(cached):
        return Selection(target, provider, cached["choices"], cached["timings_ms"], cached["skipped"], True,
                         str(choices.path(CACHE_KIND, key)))
    chosen: list[Candidate] = []
    picked, timings, skipped = {}, {}, {}
    for kind, candidates in CANDIDATES.items():
        sessions = {}
        for candidate in candidates:
            built = _build(model, [*chosen, candidate], provider, feeds)
            if isinstance(built, str):
                skipped[f"{kind}:{candidate.name}"] = built
            else:
                sessions[candidate.name] = built
        if len(sessions) < 2 or candidates[0].name not in sessions:
            skipped[kind] = "nothing to choose: " + (", ".join(sessions) or "no candidate applies")
            continue
        medians = timing.medians(timing.interleaved({n: (lambda s=s: s.run(feeds)) for n, s in sessions.items()}, rounds=rounds))
        timings[kind] = {n: round(t * 1e3, 3) for n, t in medians.items()}
        picked[kind] = min(medians, key=medians.get)
        chosen.append(_candidate(kind, picked[kind]))
    selection = Selection(target, provider, picked, timings, skipped, False, str(choices.path(CACHE_KIND, key)))
    if use_cache:
        choices.write(CACHE_KIND, key, {"choices": picked, "timings_ms": timings, "skipped": skipped})
    return selection


def apply_metadata(model: ir.Model, selection: Selection) -> None:
    """Record the session settings the chosen lowering needs in the model."""
    model.metadata_props[TARGET_KEY] = selection.target
    if selection.disabled:
        model.metadata_props[DISABLED_KEY] = ",".join(selection.disabled)
    else:
        model.metadata_props.pop(DISABLED_KEY, None)


def _candidate(kind: str, name: str) -> Candidate:
    return next(c for c in CANDIDATES[kind] if c.name == name)


def _build(model: ir.Model, candidates: list[Candidate], provider: str, feeds: Mapping[str, np.ndarray]):
    """A session for `model` lowered by `candidates` (run once on `feeds`), or why the last
    candidate does not apply."""
    work = model.clone()
    for candidate in candidates:
        for name in candidate.passes:
            counts = registry.get(name)(work)
            if candidate is candidates[-1] and not any(counts.values()):
                return f"{name} does not apply to this model"
    disabled = tuple(d for c in candidates for d in c.disabled)
    try:
        built = session_for(exporters.to_proto(work).SerializeToString(), provider, disabled=disabled)
        built.run(feeds)
        return built
    except BackendError as exc:
        return f"onnxruntime cannot run it: {exc}"


def _cache_key(model: ir.Model, feeds: Mapping[str, np.ndarray], provider: str) -> str:
    return choices.key(model, feeds, f"v{CACHE_VERSION}|{provider}|onnxruntime {ort.__version__}|"
                       + repr({kind: [c.name for c in cs] for kind, cs in CANDIDATES.items()}))


def details(selection: dict[str, Any]) -> list[Table]:
    """One table per op kind: every candidate's median, the chosen one marked; what was not timed as rows too."""
    cached = " (cached choice)" if selection.get("cached") else ""
    tables = []
    for kind, choice in selection["choices"].items():
        rows = [{"candidate": n, "median_ms": t, "note": "chosen" if n == choice else ""}
                for n, t in selection["timings_ms"].get(kind, {}).items()]
        rows += [{"candidate": what.split(":", 1)[1], "note": f"not timed: {why}"}
                 for what, why in selection["skipped"].items() if what.startswith(f"{kind}:")]
        tables.append(Table(f"lowering for {selection['target']} ({selection['provider']}){cached}: {kind}",
                            columns(("candidate", "candidate"), ("median_ms", "median ms", ".2f"), ("note", "note")),
                            rows, chosen=choice, chart="median_ms", unit="ms"))
    untimed = {what: why for what, why in selection["skipped"].items() if ":" not in what}
    if untimed:
        tables.append(Table(f"lowering for {selection['target']}: op kinds not timed",
                            columns(("kind", "op kind"), ("why", "why")), [{"kind": k, "why": w} for k, w in untimed.items()]))
    return tables


class OrtLowering(LoweringStep):
    """Per op kind, the lowering measured fastest on the stage's inputs and provider (cached)."""

    def details(self, measurements: dict[str, Any]) -> Details:
        lines = []
        if "vs_input" in measurements:
            v = measurements["vs_input"]
            lines.append(f"against the input as given, both in default sessions: lowered {v['lowered_ms']:.2f} ms, "
                         f"input {v['input_ms']:.2f} ms; kept: {v['kept']}")
        return Details(details(measurements), lines=lines)

    def choose(self, stage: Stage) -> Lowering:
        if stage.feeds is None:
            raise InputError(f"target '{self.target}' needs inputs to measure the candidates on")
        selection = select(stage.model.ir, stage.feeds, self.target, use_cache=self.options.use_cache)
        passes = [registry.get(name) for name in selection.passes]
        measured = selection.to_dict()
        given = None if stage.approximate else stage.given  # after an approximate step the input is another function
        if given is not None:
            measured["vs_input"] = _versus_input(stage, given, passes, selection.provider)
            if measured["vs_input"]["kept"] == "input as given":
                return Lowering([], measured, lambda model: apply_metadata(model.ir, selection), replace=given)
        return Lowering(passes, measured, lambda model: apply_metadata(model.ir, selection))


def _versus_input(stage: Stage, given, passes, provider: str, rounds: int = 15) -> dict[str, Any]:
    """The lowered stage against the plan's input as given, both in default sessions (what a user
    runs): graphopt's output must not be the slower one."""
    lowered = stage.model.clone()
    for p in passes:
        p(lowered.ir)
    sessions = {name: session_for(exporters.to_proto(m).SerializeToString(), provider, disabled=())
                for name, m in (("lowered", lowered), ("input as given", given))}
    medians = timing.medians(timing.interleaved({n: (lambda s=s: s.run(stage.feeds)) for n, s in sessions.items()},
                                                rounds=rounds))
    return {"lowered_ms": round(medians["lowered"] * 1e3, 3), "input_ms": round(medians["input as given"] * 1e3, 3),
            "kept": min(medians, key=medians.get)}


for _target in TARGETS:
    registry.register_target(_target, OrtLowering)
