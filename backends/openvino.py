"""OpenVINO backend (CPU): the only module that imports openvino, lazily.

    compiled = openvino.compile(model, precision="bf16", shapes={"input_ids": [1, 128]})
    outputs = compiled.run(feeds)
    openvino.save(compiled, "model.xml")          # OpenVINO IR (.xml + .bin)
    openvino.load("model.xml").run(feeds)

The model goes in portable form (graphopt functions inlined: OpenVINO has no conversion rule for
model-local functions in a custom domain), is read from ONNX, optionally reshaped to static
shapes, and compiled for CPU with an inference precision hint: "f32", "bf16" or "f16" (None:
OpenVINO's own default, which is bf16 on CPUs with AVX512-BF16 or AMX). What the CPU supports
is read from OpenVINO (`capabilities()`), never assumed.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphopt import exporters, registry
from graphopt.errors import BackendError, InputError, first_line
from graphopt.model import Model

PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16"}
CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}  # OPTIMIZATION_CAPABILITIES names
SIGNATURE_SUFFIX = ".json"
# What a model goes through on its way to OpenVINO: standard ONNX, then the exact rewrites into
# the forms OpenVINO's CPU fusions take (passes/openvino_lowering.py).
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
    return precision == "f32" or CAPABILITY[precision] in capabilities()


def default_precision() -> str:
    """The inference precision OpenVINO picks on this CPU when none is asked for."""
    return _ov().Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16", "f16"


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
    """An openvino.Model from a graphopt Model (made portable), an .onnx/.xml file, or an
    openvino.Model (returned as it is, reshaped if asked)."""
    ov = _ov()
    core = ov.Core()
    try:
        if isinstance(model, ov.Model):
            ov_model = model
        elif isinstance(model, (str, os.PathLike)):
            ov_model = core.read_model(os.fspath(model))
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
    """Compile for CPU. `precision`: "f32", "bf16", "f16", or None for OpenVINO's default;
    `threads`: inference threads (default: OpenVINO's choice, every core)."""
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"unknown OpenVINO precision '{precision}'", hint=f"choose from {', '.join(PRECISIONS)}")
    ov_model = read(model, shapes)
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = PRECISIONS[precision]
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
    path.parent.mkdir(parents=True, exist_ok=True)
    if executable.precision:
        executable.model.set_rt_info(executable.precision, ["runtime_options", "INFERENCE_PRECISION_HINT"])
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        ov.save_model(executable.model, str(stage / path.name), compress_to_fp16=False)
        os.replace(stage / path.with_suffix(".bin").name, path.with_suffix(".bin"))
        os.replace(stage / path.name, path)
    finally:
        for leftover in stage.iterdir():
            leftover.unlink()
        stage.rmdir()
    return path


def load(path: str | os.PathLike, *, threads: int | None = None) -> Executable:
    """Compile a saved .xml artifact with the precision hint it was saved with."""
    ov_model = read(path)
    precision = None
    if ov_model.has_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]):
        precision = ov_model.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str)
    return compile(ov_model, precision=precision, threads=threads)
