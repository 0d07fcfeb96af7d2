"""Model inputs: seeded generation and `.npz` loading, both checked against the model.

Generated inputs respect dtypes, bind free dims (symbolic, unnamed or -1) to defaults the user
can override by name or by input and axis, and keep integer inputs that are token ids,
positions or masks valid. `graphopt/fitting.py` searches for sizes the model runs at.
Strings are seeded words over a fixed alphabet; a sequence is SEQUENCE_LENGTH generated tensors
of its element type and shape; an optional input gets its contained type. A type nothing here
can generate raises `CannotGenerate` (optimize then runs without numeric checks, and says so).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from graphopt import ops
from graphopt.errors import InputError
from graphopt.ir import ir
from graphopt.model import Model

DEFAULT_DIMS: Mapping[str, int] = {"batch": 1, "seq": 128}
SEQUENCE_LENGTH = 3
ALPHABET = np.array(list("abcdefghijklmnopqrstuvwxyz"))


class CannotGenerate(InputError):
    """An input of a type (or without a shape) that seeded generation cannot fill."""
_PASS_THROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Identity"})


def make_inputs(model: Model, *, seed: int = 0, dims: Mapping[str, int] | None = None,
                values: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input that is not an initializer.

    dims: sizes of free dims, by dim name ("seq") or by input and axis ("x:0"); a free dim is
    a symbolic one, an unnamed one or one declared negative (-1). values: inputs filled with
    one value (a scalar that selects an If branch, e.g. a sample rate), by input name."""
    dims = {**DEFAULT_DIMS, **(dims or {})}
    rng = np.random.default_rng(seed)
    made = {v.name: _make_one(v, rng, dims) for v in _runtime_inputs(model)}
    for name, value in (values or {}).items():
        if name in made and isinstance(made[name], np.ndarray):
            made[name] = np.full_like(made[name], value)
    return made


def free_dims(model: Model) -> dict[str, list[tuple[str, int]]]:
    """The dims generation binds, by the key `dims` takes (a dim's name, or "input:axis" for
    an unnamed or negative one), each with the (input, axis) places it sizes."""
    found: dict[str, list[tuple[str, int]]] = {}
    for value in _runtime_inputs(model):
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, int) and dim >= 0:
                continue
            name = dim.value if isinstance(dim, ir.SymbolicDim) and _named(dim) else f"{value.name}:{axis}"
            found.setdefault(name, []).append((value.name, axis))
    return found


def shapes(feeds: Mapping[str, object]) -> dict[str, list[int]]:
    """Each input's shape; a sequence's as [length, *element shape]."""
    def one(v):
        if isinstance(v, list):
            return [len(v), *(list(np.shape(v[0])) if v else [])]
        return list(np.shape(v))
    return {k: one(v) for k, v in feeds.items()}


def load_inputs(path: str | os.PathLike, model: Model) -> dict[str, np.ndarray]:
    """Inputs from an `.npz` file keyed by input name, checked against the model."""
    feeds = read_npz(path)
    check_inputs(feeds, model, where=str(path))
    return feeds


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays by name from an `.npz` file; a missing or unreadable file is an InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"inputs file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path} is not a readable .npz file ({exc})", hint="write it with numpy.savez") from None
    return feeds


def check_inputs(feeds: Mapping[str, np.ndarray], model: Model, *, where: str = "inputs") -> None:
    """Names, dtypes and static dims must match the model's inputs; symbolic dims must agree."""
    expected = {v.name: v for v in _runtime_inputs(model)}
    problems = []
    missing = sorted(set(expected) - set(feeds))
    unknown = sorted(set(feeds) - set(expected))
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if unknown:
        problems.append(f"unknown {', '.join(unknown)} (model inputs: {', '.join(expected)})")
    bound: dict[str, tuple[int, str]] = {}
    for name, value in expected.items():
        if name not in feeds:
            continue
        array = np.asarray(feeds[name])
        want_dtype = _numpy_dtype(value)
        if want_dtype is not None and array.dtype != want_dtype:
            problems.append(f"'{name}' has dtype {array.dtype}, the model wants {want_dtype}")
        if value.shape is None:
            continue
        if array.ndim != len(value.shape):
            problems.append(f"'{name}' has shape {list(array.shape)}, the model wants rank {len(value.shape)} {_shape_str(value.shape)}")
            continue
        for axis, (dim, got) in enumerate(zip(value.shape, array.shape)):
            if isinstance(dim, int) and dim >= 0 and dim != got:  # -1: any size
                problems.append(f"'{name}' has shape {list(array.shape)}, the model wants {_shape_str(value.shape)} (axis {axis})")
                break
            if isinstance(dim, ir.SymbolicDim) and _named(dim):
                first = bound.setdefault(dim.value, (got, name))
                if first[0] != got:
                    problems.append(f"dim '{dim.value}' is {first[0]} in '{first[1]}' but {got} in '{name}'")
    if problems:
        raise InputError(f"inputs do not fit the model: {'; '.join(problems)}", where=where)


def _runtime_inputs(model: Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if not v.is_initializer()]


def _numpy_dtype(value: ir.Value):
    if not isinstance(value.type, ir.TensorType):
        return None
    try:
        return value.dtype.numpy()
    except (TypeError, ValueError, AttributeError):
        return None


def _shape_str(shape: ir.Shape) -> str:
    return "[" + ", ".join(str(d.value if isinstance(d, ir.SymbolicDim) else d) for d in shape) + "]"


def _bind_shape(value: ir.Value, dims: Mapping[str, int]) -> tuple[int, ...]:
    if value.shape is None:
        raise InputError(f"input '{value.name}' has no shape", hint="pass inputs with --inputs data.npz")
    out = []
    for axis, dim in enumerate(value.shape):
        if isinstance(dim, int) and dim >= 0:
            out.append(dim)
        elif f"{value.name}:{axis}" in dims:
            out.append(dims[f"{value.name}:{axis}"])
        elif isinstance(dim, int) or not _named(dim):  # unnamed ("", "?"), or declared -1
            out.append(dims["batch"] if axis == 0 else dims["seq"])
        else:
            out.append(_bind_named(dim.value, axis, dims))
    return tuple(out)


def _named(dim: ir.SymbolicDim) -> bool:
    """A dim with a name of its own; exporters write "?" (Paddle) or "" for none."""
    return bool(dim.value) and dim.value != "?"


def _bind_named(name: str, axis: int, dims: Mapping[str, int]) -> int:
    if name in dims:
        return dims[name]
    lowered = name.lower()
    if "batch" in lowered:
        return dims["batch"]
    if any(k in lowered for k in ("seq", "len", "token", "past", "total")):
        return dims["seq"]
    return dims["batch"] if axis == 0 else dims["seq"]


def _make_one(value: ir.Value, rng: np.random.Generator, dims: Mapping[str, int], type_=None):
    type_ = value.type if type_ is None else type_
    if isinstance(type_, ir.OptionalType):  # a present value of the contained type
        return _make_one(value, rng, dims, type_.elem_type)
    if isinstance(type_, ir.SequenceType):  # value.shape is the element's shape
        return [_make_one(value, rng, dims, type_.elem_type) for _ in range(SEQUENCE_LENGTH)]
    dtype = _tensor_dtype(type_)
    if dtype is None:
        raise CannotGenerate(f"cannot generate input '{value.name}' of type {type_}", hint="pass inputs with --inputs data.npz")
    if value.shape is None:
        raise CannotGenerate(f"input '{value.name}' has no shape", hint="pass inputs with --inputs data.npz")
    shape = _bind_shape(value, dims)
    name = value.name.lower()
    if dtype.kind in "OSU":  # strings: seeded words of 1 to 8 letters
        lengths = rng.integers(1, 9, size=shape)
        words = ["".join(rng.choice(ALPHABET, int(n))) for n in lengths.ravel()]
        return np.array(words, dtype=object).reshape(shape)
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)  # an array even for a scalar (onnxruntime takes no numpy.bool)
    if dtype.kind in "iu":
        if "mask" in name:
            return np.ones(shape, dtype)
        if "position" in name:
            length, bound = (shape[-1] if shape else 1), _index_bound(value)
            if bound is not None and length > bound:
                raise InputError(f"input '{value.name}' indexes a table of {bound} positions but the generated length is {length}",
                                 hint=f"pass dims with a sequence length of at most {bound} (e.g. --dims seq={bound})")
            return np.broadcast_to(np.arange(length, dtype=dtype), shape).copy()
        if "token_type" in name or "segment" in name:
            return np.zeros(shape, dtype)
        high = _index_bound(value) or 2
        return rng.integers(0, high, size=shape).astype(dtype)
    return np.asarray(rng.standard_normal(shape), dtype=dtype)


def _tensor_dtype(type_) -> np.dtype | None:
    if not isinstance(type_, ir.TensorType):
        return None
    if type_.dtype == ir.DataType.STRING:
        return np.dtype(object)
    try:
        return np.dtype(type_.dtype.numpy())
    except (TypeError, ValueError, AttributeError):
        return None


def _index_bound(value: ir.Value, depth: int = 4) -> int | None:
    """The valid index range when `value` (maybe through Casts/Reshapes) indexes a constant table."""
    bounds = []
    for node, index in value.uses():
        if (node.domain, node.op_type) == ops.GATHER and index == 1:
            table = node.inputs[0]
            axis = node.attributes.get_int("axis", 0)
            if table is not None and table.shape is not None and isinstance(table.shape[axis], int):
                bounds.append(table.shape[axis])
        elif node.op_type in _PASS_THROUGH and index == 0 and depth > 0:
            bound = _index_bound(node.outputs[0], depth - 1)
            if bound:
                bounds.append(bound)
    return min(bounds) if bounds else None
