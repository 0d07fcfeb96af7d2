"""Constant weights: read them as numpy, and make new initializers whose names
derive from the originals (unique within the graph)."""

from __future__ import annotations

import numpy as np

from graphopt import model as model_mod, ops
from graphopt.ir import ir


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents, or None.

    Constant means an initializer, a Constant node, or a ConstantOfShape of a
    constant shape (a fill that constant folding leaves alone when it is large).
    """
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return tensor.numpy()
    node = value.producer()
    if node is not None and (node.domain, node.op_type) == ops.CONSTANT_OF_SHAPE:
        shape = const_array(node.inputs[0])
        fill = node.attributes.get("value")
        if shape is not None:
            fill_array = fill.as_tensor().numpy().reshape(()) if fill is not None else np.float32(0)
            return np.full(tuple(int(d) for d in shape), fill_array, dtype=np.asarray(fill_array).dtype)
    return None


def release_if_unused(value: ir.Value | None) -> None:
    """A replaced weight that nothing reads any more gives back its memory-mapped pages now
    rather than at the end of the pass (it maps again if read); a pass that replaces many
    weights then holds about one of them at a time. Anything else is left alone."""
    tensor = value.const_value if value is not None else None
    if isinstance(tensor, ir.ExternalTensor) and not model_mod.is_read(value):
        model_mod.release(tensor)


def new_initializer(op, like: ir.Value, array: np.ndarray, suffix: str) -> ir.Value:
    """An initializer named after `like` (e.g. `conv.weight_bnfold`), unique in its graph."""
    graph = like.graph
    base = f"{like.name or 'w'}_{suffix}"
    name, n = base, 1
    while graph is not None and name in graph.initializers:
        name, n = f"{base}{n}", n + 1
    return op.initializer(ir.tensor(_contiguous(array), name=name), name=name)


def add_initializer(graph: ir.Graph, like: ir.Value | None, array: np.ndarray, suffix: str) -> ir.Value:
    """Register a new initializer named after `like` (`<name>_<suffix>`, unique) in `graph`.
    For structural passes; rules create initializers through their op builder instead."""
    base = f"{(like.name if like is not None else None) or 'w'}_{suffix}"
    name, n = base, 1
    while name in graph.initializers:
        name, n = f"{base}{n}", n + 1
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(_contiguous(array), name=name))
    graph.register_initializer(value)
    return value


def _contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping the rank (np.ascontiguousarray turns a 0-d array into shape [1])."""
    return np.array(array, order="C", copy=not array.flags.c_contiguous)


def bn_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) with BN(y) = s * y + t per channel, in float64; None if not constant."""
    params = [const_array(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    s = gamma / np.sqrt(var + bn.attributes.get_float("epsilon", 1e-5))
    return s, beta - mean * s


def bias_or_zeros(node: ir.Node, index: int, size: int) -> np.ndarray | None:
    """The constant bias input (zeros when absent), or None when it is not constant."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return np.zeros(size)
    b = const_array(node.inputs[index])
    return None if b is None else b.astype(np.float64)
