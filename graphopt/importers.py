"""Bring models into graphopt: ONNX files (external data included), ModelProtos,
onnx_ir models, and torch modules (through torch's dynamo exporter).

Every problem found is reported at once, as an `InputError` that names the
file, tensor or node and says what to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from graphopt import folders, functions, ops, protowire
from graphopt.errors import InputError, UnsupportedModelError, first_line
from graphopt.ir import ir
from graphopt.model import Model

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike | onnx.ModelProto | ir.Model | Model | Any


def load(
    source: ModelSource,
    *,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    check: bool = True,
    task: str | None = None,
) -> Model:
    """Load a model from a path, a ModelProto, an onnx_ir model, or a torch module; a path may
    be a local Hugging Face / sentence-transformers folder (config.json + weights), exported
    for `task` or the one its config names (graphopt/folders.py).

    For a torch module, `example_inputs` (a tuple of positional args, or a dict of
    keyword args) is required; `dynamic_shapes` follows `torch.onnx.export`, with
    string names for dynamic dims, e.g. `{"input_ids": {0: "batch", 1: "seq"}}`.
    Use batch >= 2 in the examples when the batch dim is dynamic.
    """
    if isinstance(source, Model):
        model = source
    elif isinstance(source, (str, os.PathLike)) and folders.is_model_folder(Path(source)):
        model = folders.load_folder(Path(source), task)
    elif isinstance(source, (str, os.PathLike)):
        model = _load_path(Path(source))
    elif isinstance(source, onnx.ModelProto):
        model = Model(_deserialize(source, where="ModelProto"))
    elif isinstance(source, ir.Model):
        model = Model(source)
    elif _is_torch_module(source):
        model = _load_torch(source, example_inputs, dynamic_shapes)
    else:
        raise InputError(
            f"cannot load a {type(source).__name__}",
            hint="pass an .onnx path, an onnx.ModelProto, an onnx_ir.Model or a torch.nn.Module with example_inputs",
        )
    functions.ensure(model.ir)  # graphopt's own ops called without their definitions get them
    if check:
        check_supported(model.ir)
    return model


def _load_path(path: Path) -> Model:
    if not path.exists():
        raise InputError(f"file not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory without a config.json",
                         hint="pass the .onnx file inside it, or a Hugging Face model folder")
    if path.stat().st_size >= SPLIT_BYTES:
        split = _split_file(path)
        if split is not None:
            return Model(_load_path(split).ir, source=path.resolve())
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-ish or ValueError
        raise InputError(
            f"{path} is not a readable ONNX model ({first_line(exc)})",
            hint="check that the file is complete and really an ONNX protobuf",
        ) from None
    if not proto.HasField("graph") or not proto.opset_import:
        raise InputError(f"{path} is not an ONNX model (no graph or no opset imports)", hint="check that the file is complete")
    _check_external_data(proto, path.parent, path)
    try:
        onnx.checker.check_model(os.fspath(path), full_check=False)  # by path: resolves external data beside it
    except onnx.checker.ValidationError as exc:
        raise InputError(f"{path} is not a valid ONNX model: {first_line(exc)}", hint="check that the file is complete") from None
    model = _deserialize(proto, where=str(path))
    ir.external_data.set_base_dir(model.graph, path.parent)
    del proto  # the weights now live in the ir model (or stay in their mapped files)
    return Model(model, source=path.resolve())


def _split_file(path: Path) -> Path | None:
    """A single-file model this large, written once more with its weights as external data in a
    temporary directory (removed when the process exits), to be loaded from there
    memory-mapped: the weights are held once, as file pages the kernel can drop, every check
    feeds them by reference, and neither the loader nor the checker parses the whole model.
    The split works on the protobuf's wire format (graphopt/protowire.py), so the weights'
    bytes never pass through the process. None when the file already has external data (it
    is then loaded as it is)."""
    import atexit
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="graphopt-weights-"))
    atexit.register(shutil.rmtree, directory, True)
    target = directory / path.name
    try:
        done = protowire.split(path, target, location="weights.data")
    except ValueError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise InputError(f"{path} is not a readable ONNX model ({exc})",
                         hint="check that the file is complete and really an ONNX protobuf") from None
    except OSError as exc:  # e.g. no space for the temporary copy: load it whole instead
        logger.warning("could not split %s into external data in %s (%s); loading it whole", path, directory, exc)
        done = False
    if not done:
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return target


SPLIT_BYTES = 256 << 20  # a single-file model this large holds its weights in a memory-mapped file


def _deserialize(proto: onnx.ModelProto, *, where: str) -> ir.Model:
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise InputError(f"cannot read the model graph: {first_line(exc)}", where=where) from None


def _check_external_data(proto: onnx.ModelProto, base_dir: Path, path: Path) -> None:
    """Every external tensor's file must exist and hold its byte range."""
    problems: dict[str, list[str]] = {}
    for tensor in _external_tensors(proto.graph):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        file = base_dir / location
        offset, length = int(info.get("offset", 0) or 0), int(info.get("length", 0) or 0)
        if not location or not file.is_file():
            problems.setdefault(f"missing external data file '{location}'", []).append(tensor.name)
        elif length and file.stat().st_size < offset + length:
            problems.setdefault(f"external data file '{location}' is truncated", []).append(tensor.name)
    if problems:
        what = "; ".join(f"{msg} for {len(names)} tensor(s), e.g. '{names[0]}'" for msg, names in problems.items())
        raise InputError(what, where=str(path), hint=f"keep the data file(s) beside the model in {base_dir}")


def _external_tensors(graph: onnx.GraphProto):
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                yield attr.t
            for g in (*([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []), *attr.graphs):
                yield from _external_tensors(g)


def check_supported(model: ir.Model) -> None:
    """Raise `UnsupportedModelError` listing every node whose op no runtime here knows."""
    local = {(f.domain, f.name) for f in model.functions.values()}
    unknown: dict[str, list[str]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if not _is_known(node, local, model.opset_imports):
            unknown.setdefault(str(ops.OpId(node.domain, node.op_type)), []).append(node.name or "<unnamed>")
    for function in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(function):
            if not _is_known(node, local, {**model.opset_imports, **function.opset_imports}):
                unknown.setdefault(str(ops.OpId(node.domain, node.op_type)), []).append(node.name or "<unnamed>")
    if unknown:
        listing = ", ".join(f"{op} (node '{names[0]}'{f' and {len(names) - 1} more' if len(names) > 1 else ''})" for op, names in unknown.items())
        raise UnsupportedModelError(
            f"unsupported operators: {listing}",
            hint="graphopt reads ONNX, ONNX-ML and com.microsoft ops and model-local functions; "
            "add the function definitions to the model or convert those ops first",
        )


def _is_known(node: ir.Node, local_functions: set[tuple[str, str]], opsets: Mapping[str, int]) -> bool:
    if (node.domain, node.op_type) in local_functions:
        return True
    domain = ops.normalize_domain(node.domain)
    if domain in ops.SCHEMA_DOMAINS:
        version = opsets.get(domain, opsets.get("ai.onnx" if domain == "" else domain))
        try:
            if version is None:
                return onnx.defs.has(node.op_type, domain)
            onnx.defs.get_schema(node.op_type, version, domain)
            return True
        except onnx.defs.SchemaError:
            return False
    return domain in ops.RUNTIME_DOMAINS


def _is_torch_module(obj: Any) -> bool:
    torch = __import__("sys").modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _load_torch(module: Any, example_inputs: Any, dynamic_shapes: Any) -> Model:
    import torch

    if example_inputs is None:
        raise InputError("a torch module needs example_inputs", hint="pass a tuple of tensors or a dict of keyword tensors")
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, Mapping) else (tuple(example_inputs), None)
    module.eval()
    with _quiet_torch_export():
        try:
            program = torch.onnx.export(
                module, args, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes, optimize=True, verbose=False
            )
        except Exception as exc:
            raise InputError(
                f"torch export of {type(module).__name__} failed: {first_line(exc)}",
                hint="check example_inputs and dynamic_shapes (use batch >= 2 when batch is dynamic); rerun with --debug for details",
            ) from exc
    return Model(program.model)


@contextlib.contextmanager
def _quiet_torch_export():
    """torch's exporter logs warnings for optional packages (torchvision) at WARNING level."""
    names = ("torch.onnx", "torch._dynamo", "torch.export", "torch.fx.experimental.symbolic_shapes")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)

