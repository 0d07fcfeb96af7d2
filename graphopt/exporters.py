"""Write models as ONNX files the installed onnxruntime accepts.

Writes are atomic: everything goes into a temporary folder beside the target,
then is renamed into place (external data first, the model last), so a failed
save never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx

from graphopt import atomic, protowire
from graphopt import sessions as ort_backend
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
    with atomic.staged(path) as stage, _ort_compatible(model.ir):  # the model file is renamed in last
        staged = stage / path.name
        if external_data:
            ir.save(model.ir, staged, format="protobuf", external_data=data_name, size_threshold_bytes=EXTERNAL_THRESHOLD_BYTES)
        else:
            _write_streamed(model.ir, staged)
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


def _write_streamed(model: ir.Model, path: Path) -> None:
    """`model` as one self-contained protobuf file, writing the main graph's initializers one
    at a time and each one's raw bytes straight from its array or, for mapped external data,
    file to file: saving holds no serialized copy of the weights (before, the ModelProto and
    then its bytes: twice the model). Protobuf fields may come in any order and a repeated
    field's entries may be written apart: the file parses to the same ModelProto that
    `onnx.save(_inline_proto(model))` writes, its graph's initializers after the nodes."""
    shell = model.clone()  # shares the tensors; the copy loses its main-graph initializers only
    values = list(model.graph.initializers.values())
    shell.graph.initializers.clear()
    proto = ir.serde.serialize_model(shell)
    graph = proto.graph.SerializeToString()
    proto.ClearField("graph")
    head = proto.SerializeToString()
    parts = [_tensor_parts(v) for v in values]  # (serialized fields but raw_data, raw_data's size)
    sizes = [len(fields) + (len(protowire.field_header(protowire.TENSOR_RAW_DATA, raw)) + raw if raw is not None else 0)
             for fields, raw in parts]
    total = len(graph) + sum(len(protowire.field_header(protowire.GRAPH_INITIALIZER, n)) + n for n in sizes)
    with open(path, "wb") as f:
        f.write(head)
        f.write(protowire.field_header(protowire.MODEL_GRAPH, total))
        f.write(graph)
        for value, (fields, raw), size in zip(values, parts, sizes):
            f.write(protowire.field_header(protowire.GRAPH_INITIALIZER, size))
            f.write(fields)
            if raw is None:
                continue
            f.write(protowire.field_header(protowire.TENSOR_RAW_DATA, raw))
            start = f.tell()
            _write_raw(value.const_value, f)
            if f.tell() - start != raw:  # a tensor's bytes are its nbytes; anything else is a bug
                raise RuntimeError(f"initializer '{value.name}' wrote {f.tell() - start} bytes, not {raw}")


def _tensor_parts(value: ir.Value) -> tuple[bytes, int | None]:
    """An initializer as (its TensorProto's fields except raw_data, the raw_data's length),
    or (its whole serialization, None) for what is not plain raw bytes (strings, small)."""
    tensor = value.const_value
    if tensor.dtype == ir.DataType.STRING or tensor.nbytes < STREAMED_BYTES:
        if isinstance(tensor, ir.ExternalTensor):
            tensor = ir.tensor(tensor.numpy(), name=value.name)
        serialized = ir.serde.serialize_tensor(tensor)
        serialized.name = value.name
        return serialized.SerializeToString(), None
    header = onnx.TensorProto(name=value.name, data_type=tensor.dtype.value, dims=tensor.shape.numpy())
    if tensor.doc_string:
        header.doc_string = tensor.doc_string
    for key, prop in tensor.metadata_props.items():
        header.metadata_props.add(key=key, value=prop)
    return header.SerializeToString(), tensor.nbytes


def _write_raw(tensor, f) -> None:
    """A tensor's raw bytes (little-endian, packed as TensorProto.raw_data holds them)."""
    if isinstance(tensor, ir.ExternalTensor):
        tensor.tofile(f)  # file to file where the kernel can
        return
    array = tensor.numpy() if type(tensor) is ir.Tensor and tensor.dtype.bitwidth >= 8 else None
    if array is not None and array.dtype.kind in "biuf" and np.little_endian:  # numpy-native (not ml_dtypes')
        f.write(memoryview(np.ascontiguousarray(array)).cast("B"))  # no copy of the bytes
        return
    f.write(tensor.tobytes())


STREAMED_BYTES = 4096  # initializers this large have their raw bytes written without a copy


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
    with atomic.staged(path) as stage:
        with open(stage / path.name, "wb") as f:  # a file object: np.savez adds no .npz suffix
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return path
