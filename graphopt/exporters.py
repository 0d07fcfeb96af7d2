"""Write models as ONNX files the installed onnxruntime accepts.

Writes are atomic: everything goes into a temporary folder beside the target,
then is renamed into place (external data first, the model last), so a failed
save never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx

from graphopt.backends import ort as ort_backend
from graphopt.errors import InputError
from graphopt.ir import ir
from graphopt.model import Model

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 2**26  # 2 GiB less a margin for the graph itself
EXTERNAL_THRESHOLD_BYTES = 1024


def save(model: Model | ir.Model, path: str | os.PathLike, *, external_data: bool | None = None, force: bool = False) -> Path:
    """Save `model` to `path` atomically.

    external_data: True writes initializers to `<name>.data` beside the model; None
    (default) does so only when the weights exceed the 2 GB protobuf limit.
    force: allow overwriting the file the model was loaded from.
    """
    model = model if isinstance(model, Model) else Model(model)
    path = Path(path)
    check_target(model, path, force)
    if external_data is None:
        external_data = model.parameter_bytes() > PROTOBUF_LIMIT
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{path.name}.data"
    with _staging_dir(path) as stage, _ort_compatible(model.ir):
        staged = stage / path.name
        if external_data:
            ir.save(model.ir, staged, format="protobuf", external_data=data_name, size_threshold_bytes=EXTERNAL_THRESHOLD_BYTES)
        else:
            _write_streamed(model.ir, staged)
        for name in sorted(os.listdir(stage), key=lambda n: n == path.name):  # the model last
            os.replace(stage / name, path.parent / name)
    logger.info("saved %s%s", path, f" (+ {data_name})" if external_data else "")
    return path


def to_proto(model: Model | ir.Model) -> onnx.ModelProto:
    """A self-contained ModelProto (external tensors read in) that the installed ORT loads."""
    model_ir = model.ir if isinstance(model, Model) else model
    with _ort_compatible(model_ir):
        return _inline_proto(model_ir)


@contextlib.contextmanager
def ort_loadable(model: Model | ir.Model) -> Iterator[bytes | str]:
    """Model bytes for onnxruntime, or a temporary file path when over the protobuf limit."""
    model = model if isinstance(model, Model) else Model(model)
    if model.parameter_bytes() <= PROTOBUF_LIMIT:
        yield to_proto(model).SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="graphopt-") as tmp:
        target = Path(tmp) / "model.onnx"
        save(model, target, external_data=True)
        yield os.fspath(target)


SHARED_BYTES = 1 << 20  # initializers this large are fed to checks by reference, not serialized
_SHARED_DTYPES = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.INT8, ir.DataType.UINT8,
                  ir.DataType.INT32, ir.DataType.INT64}


@contextlib.contextmanager
def ort_weightless(model: Model | ir.Model) -> Iterator[tuple[bytes | str, dict[str, np.ndarray]]]:
    """(what onnxruntime loads, weight feeds) for a check run: the main graph's large
    initializers become graph inputs fed from the model's own arrays (memory-mapped external
    data stays mapped), so a check does not copy the weights into protobuf bytes and then into
    the session. Only the graph is serialized. Tensors read by non-standard-domain ops (which
    may need constant inputs), graph outputs and dtypes numpy cannot hand over stay inline."""
    model = model if isinstance(model, Model) else Model(model)
    graph = model.ir.graph
    outputs = set(graph.outputs)
    shared = [v for v in graph.initializers.values()
              if v.const_value is not None and v.const_value.nbytes >= SHARED_BYTES and v.dtype in _SHARED_DTYPES
              and v not in outputs and all(u.node.domain in ("", "ai.onnx") for u in v.uses())]
    if not shared:
        with ort_loadable(model) as loadable:
            yield loadable, {}
        return
    feeds = {v.name: v.const_value.numpy() for v in shared}
    inputs = set(graph.inputs)
    for v in shared:  # in place, and put back below: a structural change only, no tensor is copied
        graph.initializers.pop(v.name)
        if v not in inputs:
            graph.inputs.append(v)
    try:
        with ort_loadable(model) as loadable:
            yield loadable, feeds
    finally:
        for v in shared:
            if v not in inputs:
                graph.inputs.remove(v)
            graph.register_initializer(v)


def _inline_proto(model: ir.Model) -> onnx.ModelProto:
    if any(isinstance(v.const_value, ir.ExternalTensor) for g in model.graphs() for v in g.initializers.values()):
        model = ir.external_data.load_to_model(model.clone())
    return ir.serde.serialize_model(model)


_GRAPH_FIELD = 7        # ModelProto.graph
_INITIALIZER_FIELD = 5  # GraphProto.initializer


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload_size: int) -> bytes:
    """The tag and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(payload_size)


def _write_streamed(model: ir.Model, path: Path) -> None:
    """`model` as one self-contained protobuf file, writing the main graph's initializers one
    at a time, so saving costs one tensor's serialized copy rather than the whole model's
    (twice: the ModelProto, then its bytes). Protobuf fields may come in any order and a
    repeated field's entries may be written apart: the file is the same ModelProto that
    `onnx.save(_inline_proto(model))` writes, its graph's initializers after the nodes."""
    shell = model.clone()  # shares the tensors; the copy loses its main-graph initializers only
    values = list(model.graph.initializers.values())
    shell.graph.initializers.clear()
    proto = ir.serde.serialize_model(shell)
    graph = proto.graph.SerializeToString()
    proto.ClearField("graph")
    head = proto.SerializeToString()

    def tensor_proto(value: ir.Value) -> onnx.TensorProto:
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            tensor = ir.tensor(tensor.numpy(), name=value.name)
        serialized = ir.serde.serialize_tensor(tensor)
        serialized.name = value.name
        return serialized

    sizes = [tensor_proto(v).ByteSize() for v in values]  # the graph's length precedes it
    total = len(graph) + sum(len(_field(_INITIALIZER_FIELD, n)) + n for n in sizes)
    with open(path, "wb") as f:
        f.write(head)
        f.write(_field(_GRAPH_FIELD, total))
        f.write(graph)
        for value, size in zip(values, sizes):
            data = tensor_proto(value).SerializeToString()
            if len(data) != size:  # serialization is deterministic; anything else is a bug
                raise RuntimeError(f"initializer '{value.name}' serialized to {len(data)} bytes, then {size}")
            f.write(_field(_INITIALIZER_FIELD, size))
            f.write(data)


FIRST_IR_WITH_PRIVATE_INITIALIZERS = 4  # IR 3 requires every initializer to be a graph input


@contextlib.contextmanager
def _ort_compatible(model: ir.Model):
    """Temporarily set the IR version to one the installed onnxruntime loads and the
    graph satisfies: at most ORT's newest, and at least 4 when a rewrite added
    initializers that are not graph inputs (IR 3 forbids those; 4 is a superset)."""
    original = model.ir_version
    version = min(original, ort_backend.max_ir_version())
    if version < FIRST_IR_WITH_PRIVATE_INITIALIZERS:
        inputs = set(model.graph.inputs)
        if any(v not in inputs for v in model.graph.initializers.values()):
            version = FIRST_IR_WITH_PRIVATE_INITIALIZERS
    model.ir_version = version
    try:
        yield
    finally:
        model.ir_version = original


@contextlib.contextmanager
def _staging_dir(path: Path) -> Iterator[Path]:
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_target(model: Model, path: Path, force: bool) -> None:
    """Refuse a target that is the model's source file or its external data, unless forced
    (with force, first read in weights still mapped from the file about to be replaced)."""
    target = path.resolve()
    protected = {model.source} | model.external_files() if model.source else model.external_files()
    data_target = target.with_name(f"{target.name}.data")
    if force:
        if data_target in model.external_files():
            # The model still reads weights lazily from that file: read them in first.
            ir.external_data.load_to_model(model.ir)
        return
    for p in protected:
        if p in (target, data_target):
            raise InputError(
                f"refusing to overwrite {p}, which the model was loaded from",
                hint="choose another output path, or pass force=True (--force)",
            )


def write_npz(arrays: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Arrays by name into an .npz, atomically (a temporary file beside it, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
