"""The runtimes graphopt lowers to, behind one small interface, and which one runs a saved model.

A runtime package (backends/ort/, backends/openvino/, backends/tvm/) registers one `Runtime`:
its name, the precisions it compiles at (graphopt's vocabulary, `PRECISIONS`) and `supports`
(which of them this machine runs), `compile(model, precision)` returning something with
`run(feeds)`, and the exact passes that take a model into the forms it runs best (`lowering`). The core reaches runtimes only through `registry.runtime`;
which one a saved model is meant for is in its metadata (RUNTIME_KEY, PRECISION_KEY), written
by `--target cpu` and read here once for `graphopt run`, `bench` and the Python API.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from graphopt import registry
from graphopt.errors import InputError
from graphopt.model import PRECISION_KEY, RUNTIME_KEY, Model

# graphopt's precision vocabulary, every runtime and step included: what a user passes to
# --precision and what a runtime's `precisions` lists (a runtime translates to its own spelling).
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
ALIASES = {"f32": "fp32", "f16": "fp16", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
LEGACY_PRECISION_KEY = "graphopt.openvino.precision"  # before report schema 3: OpenVINO's spelling
DEFAULT = "onnxruntime"


def precision_name(name: str | None) -> str | None:
    """graphopt's name for a precision spelled any way a runtime spells it."""
    if name is None:
        return None
    canonical = ALIASES.get(name, name)
    if canonical not in PRECISIONS:
        raise InputError(f"unknown precision '{name}'", hint=f"choose from {', '.join(PRECISIONS)}")
    return canonical


class Executable(Protocol):
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Runtime(Protocol):
    name: str
    precisions: tuple[str, ...]
    lowering: tuple[str, ...]
    needs_shapes: bool  # compile wants `shapes` (every input's static shape): TVM

    def supports(self, precision: str) -> bool:
        """Whether it runs `precision` on this machine (OpenVINO asks the CPU)."""

    def compile(self, model: Model | bytes | str | os.PathLike, precision: str | None = None, **options: Any) -> Executable:
        """`options`: `provider` (onnxruntime's execution provider), `threads`, `shapes`; a runtime
        ignores the ones that do not apply to it (OpenVINO and TVM run on this CPU)."""


def meant_for(model: Model) -> tuple[str, str | None]:
    """(runtime name, precision) a model's metadata asks for; onnxruntime at its own precision if none."""
    props = model.ir.metadata_props
    precision = props.get(PRECISION_KEY) or props.get(LEGACY_PRECISION_KEY)
    return props.get(RUNTIME_KEY, DEFAULT), precision_name(precision) if precision else None


def runtime_for(model_or_path: Model | str | os.PathLike) -> tuple[Runtime, str | None]:
    """The runtime (and precision) a model or a saved file is meant to run in."""
    model = model_or_path if isinstance(model_or_path, Model) else _load(model_or_path)
    name, precision = meant_for(model)
    return registry.runtime(name), precision


def executable_for(model_or_path: Model | str | os.PathLike, **options: Any) -> Executable:
    """Something with `run(feeds)` for a model where it is meant to run (graphopt run / bench)."""
    model = model_or_path if isinstance(model_or_path, Model) else _load(model_or_path)
    runtime, precision = runtime_for(model)
    return runtime.compile(model, precision, **options)


def _load(path) -> Model:
    from graphopt import importers

    return importers.load(path)
