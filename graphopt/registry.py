"""Passes register here by kebab-case name."""

from __future__ import annotations

import re

from graphopt.errors import InputError
from graphopt.rewrite import Pass

_PASSES: dict[str, type[Pass]] = {}
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


def _ensure_builtin() -> None:
    import graphopt.passes  # noqa: F401  (registers the built-in pass families)


def get(name: str) -> Pass:
    _ensure_builtin()
    if name not in _PASSES:
        raise InputError(f"unknown pass '{name}'", hint=f"known passes: {', '.join(sorted(_PASSES))} (see `graphopt passes`)")
    return _PASSES[name]()


def available() -> list[type[Pass]]:
    _ensure_builtin()
    return [ _PASSES[n] for n in sorted(_PASSES)]
