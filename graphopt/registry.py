"""Registries the plan reads: passes by kebab-case name, approximate steps by the option that
asks for them (`mixer`, `precision`), lowering steps by target. Families register themselves
when their package is imported; the core never imports a family by name."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from graphopt import families
from graphopt.errors import InputError
from graphopt.rewrite import Pass

_PASSES: dict[str, type[Pass]] = {}
_APPROXIMATE: dict[str, Callable[..., Any]] = {}  # option -> factory(value, options) -> ApproximateStep
_CHOICES: dict[str, Callable[[], Sequence[str]]] = {}  # option -> the values it takes (for --help and errors)
_TARGETS: dict[str, Callable[..., Any]] = {}  # target -> factory(target, options) -> LoweringStep
_ANALYSES: dict[str, Callable[..., Any]] = {}  # name -> fn(ir.Graph) -> list of dicts (`inspect`)
_RUNTIMES: dict[str, Any] = {}  # name -> graphopt.runtimes.Runtime
_STEP_OPTIONS: dict[str, tuple[str, Any]] = {}  # option name -> (who declared it, graphopt.steps.StepOption)
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make `cls` available by `cls.name`."""
    if not _NAME.match(cls.name):
        raise ValueError(f"pass name {cls.name!r} must be kebab-case")
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} is registered twice ({_PASSES[cls.name].__qualname__}, {cls.__qualname__})")
    _PASSES[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _PASSES.pop(name, None)


def register_approximate(option: str, factory: Callable[..., Any], choices: Callable[[], Sequence[str]] = tuple,
                         options: Sequence[Any] = ()) -> None:
    """`factory(value, options)` builds the approximate step that `optimize(option=value)` asks
    for; `choices()` lists the values it takes; `options` (graphopt.steps.StepOption) are the
    further options the step reads, which become `optimize` keywords and CLI flags."""
    _APPROXIMATE[option], _CHOICES[option] = factory, choices
    _declare(f"--{option}", options)


def _declare(owner: str, options: Sequence[Any]) -> None:
    for declared in options:
        known = _STEP_OPTIONS.get(declared.name)
        if known is not None and known[1] != declared:
            raise ValueError(f"step option {declared.name!r} is declared twice ({known[0]}, {owner})")
        _STEP_OPTIONS[declared.name] = (owner, declared)


def step_options() -> list[tuple[str, Any]]:
    """(who declared it, StepOption) for every option the registered steps and targets declare."""
    ensure_builtin()
    return [(owner, option) for owner, option in _STEP_OPTIONS.values()]


def step_option(name: str) -> Any:
    """The declared StepOption `name`; AttributeError when no step declares it."""
    ensure_builtin()
    if name not in _STEP_OPTIONS:
        raise AttributeError(f"no registered step declares the option '{name}'")
    return _STEP_OPTIONS[name][1]


def approximate_options() -> list[str]:
    """The options that ask for an approximate step (mixer, precision, prune, ...), in registration order."""
    ensure_builtin()
    return list(_APPROXIMATE)


def choices(option: str) -> tuple[str, ...]:
    """The values approximate option `option` takes (e.g. the mixer names)."""
    approximate_step(option)
    return tuple(_CHOICES[option]())


def register_target(target: str, factory: Callable[..., Any], options: Sequence[Any] = ()) -> None:
    """`factory(target, options)` builds the lowering step for `optimize(target=target)`;
    `options` (StepOption) as for `register_approximate`."""
    _TARGETS[target] = factory
    _declare(f"--target {target}", options)


def register_analysis(name: str, fn: Callable[..., Any]) -> None:
    """`fn(graph)` lists what a family finds in a graph (`inspect` shows it under `name`)."""
    _ANALYSES[name] = fn


def register_runtime(runtime: Any) -> Any:
    """Make a runtime (graphopt.runtimes.Runtime) available by its name."""
    _RUNTIMES[runtime.name] = runtime
    return runtime


def runtime(name: str) -> Any:
    ensure_builtin()
    if name not in _RUNTIMES:
        raise InputError(f"unknown runtime '{name}'", hint=f"known runtimes: {', '.join(sorted(_RUNTIMES))}")
    return _RUNTIMES[name]


def runtimes() -> list[str]:
    ensure_builtin()
    return sorted(_RUNTIMES)


def analysis(name: str) -> Callable[..., Any]:
    ensure_builtin()
    return _ANALYSES[name]


def ensure_builtin() -> None:
    families.load()


def get(name: str) -> Pass:
    ensure_builtin()
    if name not in _PASSES:
        raise InputError(f"unknown pass '{name}'", hint=f"known passes: {', '.join(sorted(_PASSES))} (see `graphopt passes`)")
    return _PASSES[name]()


def available() -> list[type[Pass]]:
    ensure_builtin()
    return [_PASSES[n] for n in sorted(_PASSES)]


def approximate_step(option: str) -> Callable[..., Any]:
    ensure_builtin()
    if option not in _APPROXIMATE:
        raise InputError(f"no approximate step answers '{option}'", hint=f"known: {', '.join(sorted(_APPROXIMATE))}")
    return _APPROXIMATE[option]


def targets() -> list[str]:
    ensure_builtin()
    return list(_TARGETS)


def lowering_step(target: str) -> Callable[..., Any]:
    ensure_builtin()
    if target not in _TARGETS:
        raise InputError(f"unknown target '{target}'", hint=f"known targets: {', '.join(_TARGETS)}")
    return _TARGETS[target]
