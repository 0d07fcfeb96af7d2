"""The OpenVINO runtime (CPU): the only package that imports openvino, lazily; its lowering
rewrites are in `lowering.py`.

    compiled = openvino.compile(model, precision="bf16", shapes={"input_ids": [1, 128]})
    outputs = compiled.run(feeds)
    openvino.save(compiled, "model.xml")          # OpenVINO IR (.xml + .bin)
    openvino.load("model.xml").run(feeds)

The model goes in portable form (graphopt functions inlined: OpenVINO has no conversion rule for
model-local functions in a custom domain), is read from ONNX, optionally reshaped to static
shapes, and compiled for CPU with an inference precision hint: graphopt's "fp32", "bf16" or
"fp16" (OpenVINO's own spellings "f32" and "f16" are taken too; None: OpenVINO's default, which
is bf16 on CPUs with AVX512-BF16 or AMX). What the CPU supports is read from OpenVINO
(`capabilities()`), never assumed.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphopt import atomic, exporters, registry, runtimes
from graphopt.backends.openvino import lowering as _lowering  # noqa: F401  (registers its passes)
from graphopt.errors import BackendError, InputError, first_line
from graphopt.model import Model

HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}  # graphopt's precision names -> INFERENCE_PRECISION_HINT
CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16"}  # OPTIMIZATION_CAPABILITIES names
SIGNATURE_SUFFIX = ".json"
# What a model goes through on its way to OpenVINO: standard ONNX, then the exact rewrites into
# the forms OpenVINO's CPU fusions take (lowering.py).
LOWERING = ("standardize-contrib-ops", "make-portable", "split-parallel-linears", "heads-first-keys")


def _ov():
    try:
        import openvino
    except ImportError:
        raise BackendError("the OpenVINO backend needs the openvino package",
                           hint="pip install 'graphopt[openvino]' (make test installs it)") from None
    return openvino


def version() -> str:
    return _ov().__version__


def capabilities() -> list[str]:
    """OpenVINO's CPU optimization capabilities on this machine (e.g. FP32, BF16, INT8)."""
    return list(_ov().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def supports(precision: str) -> bool:
    precision = _precision(precision)
    return precision == "fp32" or CAPABILITY[precision] in capabilities()


def default_precision() -> str:
    """The inference precision OpenVINO picks on this CPU when none is asked for (graphopt's name)."""
    return runtimes.precision_name(_ov().Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name())


def _precision(precision: str) -> str:
    """graphopt's name for a precision OpenVINO compiles at (its own spellings accepted)."""
    name = runtimes.ALIASES.get(precision, precision)
    if name not in HINTS:
        raise InputError(f"unknown OpenVINO precision '{precision}'", hint=f"choose from {', '.join(HINTS)}")
    return name


def portable(model: Model) -> Model:
    """A copy in standard ONNX only (graphopt functions inlined), lowered for OpenVINO (LOWERING)."""
    work = model.clone()
    for name in LOWERING:
        registry.get(name)(work.ir)
    return work


@dataclasses.dataclass
class Executable:
    """A compiled OpenVINO model: `run` takes and returns arrays by name."""

    compiled: Any  # openvino.CompiledModel
    model: Any  # openvino.Model
    precision: str | None
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def __post_init__(self) -> None:
        self._request = self.compiled.create_infer_request()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"missing inputs: {', '.join(missing)}", hint=f"the model takes {', '.join(self.input_names)}")
        result = self._request.infer({n: np.ascontiguousarray(feeds[n]) for n in self.input_names})
        return {name: np.array(result[self.compiled.output(i)]) for i, name in enumerate(self.output_names)}


def read(model: Model | str | os.PathLike, shapes: Mapping[str, Sequence[int]] | None = None):
    """An openvino.Model from a graphopt Model (made portable), an .onnx/.xml file, serialized
    ONNX bytes, or an openvino.Model (returned as it is, reshaped if asked)."""
    ov = _ov()
    core = ov.Core()
    try:
        if isinstance(model, ov.Model):
            ov_model = model
        elif isinstance(model, (str, os.PathLike)):
            ov_model = core.read_model(os.fspath(model))
        elif isinstance(model, bytes):  # serialized ONNX (already portable)
            with tempfile.TemporaryDirectory(prefix="graphopt-ov-") as tmp:
                (Path(tmp) / "model.onnx").write_bytes(model)
                ov_model = core.read_model(str(Path(tmp) / "model.onnx"))
        else:
            with tempfile.TemporaryDirectory(prefix="graphopt-ov-") as tmp:
                path = Path(tmp) / "model.onnx"
                exporters.save(portable(model), path)
                ov_model = core.read_model(str(path))
    except RuntimeError as exc:
        raise BackendError(f"OpenVINO cannot read the model: {_reason(exc)}",
                           hint="write it in standard ONNX first (graphopt optimize --portable)") from None
    if shapes:
        names = {p.get_any_name() for p in ov_model.inputs}
        unknown = sorted(set(shapes) - names)
        if unknown:
            raise InputError(f"--shapes names unknown inputs: {', '.join(unknown)}", hint=f"inputs: {', '.join(sorted(names))}")
        ov_model.reshape({name: list(shape) for name, shape in shapes.items()})
    return ov_model


def compile(model: Any, *, precision: str | None = "f32", threads: int | None = None,
            shapes: Mapping[str, Sequence[int]] | None = None) -> Executable:
    """Compile for CPU. `precision`: "fp32", "bf16", "fp16", or None for OpenVINO's default;
    `threads`: inference threads (default: OpenVINO's choice, every core)."""
    precision = None if precision is None else _precision(precision)
    ov_model = read(model, shapes)
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = HINTS[precision]
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        compiled = _ov().Core().compile_model(ov_model, "CPU", config)
    except RuntimeError as exc:
        raise BackendError(f"OpenVINO cannot compile the model: {_reason(exc)}") from None
    return Executable(compiled, ov_model, precision, tuple(p.get_any_name() for p in ov_model.inputs),
                      tuple(p.get_any_name() for p in ov_model.outputs))


def _reason(exc: Exception) -> str:
    """The informative line of an OpenVINO exception (its first lines are source locations)."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return first_line((useful or lines or [type(exc).__name__])[-1], 300)


def save(executable: Executable, path: str | os.PathLike) -> Path:
    """OpenVINO IR: `path` (.xml) and its .bin, written atomically; the precision hint it was
    compiled with travels in the model's runtime info."""
    ov = _ov()
    path = Path(path)
    if path.suffix != ".xml":
        raise InputError(f"an OpenVINO artifact is an .xml file (with its .bin), not '{path.name}'")
    if executable.precision:
        executable.model.set_rt_info(HINTS[executable.precision], ["runtime_options", "INFERENCE_PRECISION_HINT"])
    with atomic.staged(path) as stage:  # the .bin first, the .xml last
        ov.save_model(executable.model, str(stage / path.name), compress_to_fp16=False)
    return path


def load(path: str | os.PathLike, *, threads: int | None = None) -> Executable:
    """Compile a saved .xml artifact with the precision hint it was saved with."""
    ov_model = read(path)
    precision = None
    if ov_model.has_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]):
        precision = ov_model.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str)
    return compile(ov_model, precision=precision, threads=threads)


class OpenVinoRuntime:
    """OpenVINO on the CPU, at a precision hint; the model goes in portable form (LOWERING)."""

    name = "openvino"
    precisions = tuple(HINTS)
    lowering = LOWERING
    needs_shapes = False  # compile wants every input's static shape

    @staticmethod
    def supports(precision: str) -> bool:
        return supports(precision)

    @staticmethod
    def default_precision() -> str:
        return default_precision()

    def compile(self, model, precision: str | None = None, *, threads: int | None = None,
                shapes: Mapping[str, Sequence[int]] | None = None, provider: str | None = None) -> Executable:
        """`provider` is onnxruntime's notion: OpenVINO runs on the CPU here whatever it names."""
        return compile(model, precision=precision, threads=threads, shapes=shapes)

    @staticmethod
    def load(path: str | os.PathLike, **options: Any) -> Executable:
        return load(path, **options)


RUNTIME = registry.register_runtime(OpenVinoRuntime())
