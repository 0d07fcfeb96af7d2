"""ONNX shape inference merged into the IR, in place.

onnx_ir 1.1's ShapeInferencePass merges only the element dtype of each inferred
value, which turns sequence-typed values (seq(tensor(float))) into tensors and
makes such models unloadable. This merge copies whole types, only where the IR
has none, and shapes only of tensor-typed values.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from graphopt.ir import ir, onnx_api_call
from graphopt.model import fingerprint

logger = logging.getLogger(__name__)


INFERRED = "graphopt.shapes_inferred_for"  # model.meta: the structure shapes were last inferred for
REFINE_ROUNDS = 8  # Reshape refinement, then onnx inference again: rounds at most (each reaches one Reshape further)

Dim = int | str | None  # a static size, a named symbolic size, or unknown


def infer_shapes(model: ir.Model) -> bool:
    """Best effort: on failure log and leave the model unchanged. Returns whether anything changed.
    A model whose structure and input types have not changed since the last inference is not
    inferred again (passes that need shapes run back to back on a 3,600-node model: 0.6 s each).

    onnx's inference loses a Reshape's output shape when the target is computed from Shape
    through Casts, Slices and Concats it does not propagate (Paddle exports: every shape
    after the first such Reshape is unknown). `refine_reshapes` evaluates those targets
    symbolically, and inference runs again from the shapes it found."""
    key = (fingerprint(model), tuple((v.name, str(v.type), str(v.shape)) for v in model.graph.inputs))
    if model.meta.get(INFERRED) == key:
        return False
    model.meta[INFERRED] = key
    changed = _infer_once(model)
    for _ in range(REFINE_ROUNDS):
        if not (refine_reshapes(model) | refine_slices(model)):
            break
        changed = True
        _infer_once(model)
    return changed


def _infer_once(model: ir.Model) -> bool:
    try:
        inferred = ir.serde.deserialize_model(onnx_api_call(lambda p: onnx.shape_inference.infer_shapes(p, data_prop=True), model))
    except Exception as exc:  # exotic models can trip onnx's shape inference
        logger.warning("shape inference failed, rules see fewer shapes: %s", exc)
        return False
    changed = False
    for graph, inferred_graph in zip(model.graphs(), inferred.graphs()):
        known = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            found = known.get(name)
            if found is None or found.type is None:
                continue
            if value.type is None:
                value.type = found.type
                changed = True
            if (isinstance(value.type, ir.TensorType) and value.type == found.type
                    and found.shape is not None and value.shape != found.shape):
                value.shape = found.shape
                changed = True
    return changed


def shape_tensor(value: ir.Value | None, depth: int = 0, memo: dict | None = None) -> list[Dim] | None:
    """The contents of a 1-D integer tensor that holds a shape, each entry a static size, a
    named symbolic size or None (unknown); None when the tensor's length is not known.
    Evaluated through Shape, Cast, Concat, Slice, Gather, Squeeze/Unsqueeze, integer
    arithmetic and constants. `memo` caches values across calls on an unchanged graph."""
    if value is None or depth > 32:
        return None
    if memo is not None:
        if id(value) not in memo:
            memo[id(value)] = _shape_tensor(value, depth, memo)
        return memo[id(value)]
    return _shape_tensor(value, depth, {})


def _shape_tensor(value: ir.Value, depth: int, memo: dict) -> list[Dim] | None:
    if value.type is not None and isinstance(value.type, ir.TensorType) and value.dtype not in (ir.DataType.INT64, ir.DataType.INT32, None):
        return None
    if value.shape is not None and len(value.shape) > 1:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        array = tensor.numpy()
        return [int(v) for v in array.reshape(-1)] if array.ndim <= 1 and array.dtype.kind in "iu" else None
    node = value.producer()
    if node is None or node.domain != "":
        return None
    if node.op_type not in _EVALUATED:
        return None
    inputs = [shape_tensor(v, depth + 1, memo) if i == 0 or node.op_type == "Concat" else None for i, v in enumerate(node.inputs)]
    if node.op_type == "Shape":
        shape = node.inputs[0].shape
        if shape is None:
            return None
        dims = [d if isinstance(d, int) else (d.value or None) for d in shape]
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", len(dims))
        return dims[slice(start, end)]
    if node.op_type in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
        if node.op_type == "Cast" and ir.DataType(node.attributes.get_int("to", 0)) not in (ir.DataType.INT64, ir.DataType.INT32):
            return None
        return inputs[0]
    if node.op_type == "Concat":
        if any(part is None for part in inputs):
            return None
        return [d for part in inputs for d in part]
    if node.op_type == "Slice" and inputs[0] is not None:
        args = [_ints(v) for v in node.inputs[1:5]]
        starts, ends, axes, steps = (args + [None] * 4)[:4]
        if starts is None or ends is None or len(starts) != 1 or (axes not in (None, [0], [-1])) or (steps not in (None, [1])):
            return None
        n = len(inputs[0])
        begin, end = (max(min(v if v >= 0 else v + n, n), 0) for v in (starts[0], ends[0]))
        return inputs[0][begin:end]
    if node.op_type in _ARITHMETIC:
        left, right = shape_tensor(node.inputs[0], depth + 1, memo), shape_tensor(node.inputs[1], depth + 1, memo)
        if left is None or right is None or (len(left) != len(right) and 1 not in (len(left), len(right))):
            return None
        n = max(len(left), len(right))
        left, right = (v * n if len(v) == 1 else v for v in (left, right))
        return [_ARITHMETIC[node.op_type](a, b) if isinstance(a, int) and isinstance(b, int) else None for a, b in zip(left, right)]
    if node.op_type == "Gather" and inputs[0] is not None:
        index = _ints(node.inputs[1])
        n = len(inputs[0])
        if index is None or node.attributes.get_int("axis", 0) != 0 or any(not -n <= i < n for i in index):
            return None
        return [inputs[0][i] for i in index]
    return None


_ARITHMETIC = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
               "Div": lambda a, b: a // b if b else None}  # integer Div truncates; shapes are non-negative
_EVALUATED = frozenset({"Shape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Concat", "Slice", "Gather", *_ARITHMETIC})


def _ints(value: ir.Value | None) -> list[int] | None:
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else [int(v) for v in tensor.numpy().reshape(-1)]


def refine_slices(model: ir.Model) -> bool:
    """Give a Slice's output the input's dims on the axes it does not slice, and the sliced
    size where starts, ends and steps evaluate (`shape_tensor`), where inference left them
    unknown (legacy exports compute a rotary slice's end from the head size)."""
    changed, memo = False, {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain != "" or node.op_type != "Slice" or len(node.inputs) < 3:
            continue
        out, data = node.outputs[0], node.inputs[0]
        if data.shape is None or not isinstance(out.type, ir.TensorType):
            continue
        if out.shape is not None and (len(out.shape) != len(data.shape) or all(isinstance(d, int) for d in out.shape)):
            continue
        rank = len(data.shape)
        args = [shape_tensor(v, memo=memo) if v is not None else None for v in node.inputs[1:5]]
        starts, ends, axes, steps = (args + [None] * 4)[:4]
        if starts is None or ends is None:
            continue
        axes = axes if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(len(starts)))
        if axes is None or any(not isinstance(a, int) for a in axes) or len(axes) != len(starts):
            continue
        steps = steps if len(node.inputs) > 4 and node.inputs[4] is not None else [1] * len(starts)
        dims = list(data.shape)
        for axis, start, end, step in zip(axes, starts, ends, steps or [None] * len(starts)):
            axis %= rank
            size = data.shape[axis]
            known = all(isinstance(v, int) for v in (start, end, step, size)) and step != 0
            dims[axis] = len(range(*slice(start, end, step).indices(size))) if known else ir.SymbolicDim(None)
        old = out.shape
        if old is None or any(isinstance(new, int) and not isinstance(o, int) or (isinstance(new, ir.SymbolicDim) and new.value and not isinstance(o, int) and o.value != new.value)
                              for o, new in zip(old, dims)):
            out.shape = ir.Shape([n if (old is None or isinstance(n, int) or (isinstance(n, ir.SymbolicDim) and n.value)) else o
                                  for n, o in zip(dims, old or dims)])
            changed = True
    return changed


def refine_reshapes(model: ir.Model) -> bool:
    """Give each Reshape the output shape its target evaluates to (`shape_tensor`) where
    inference left it unknown, or left a dim unknown that the target makes static: a 0 copies
    the input's dim (allowzero 0), a -1 is the input's size over the other target sizes, named
    sizes cancelling (a legacy export's view(batch, seq, -1, head) gives the head count).
    Returns whether any shape was set."""
    changed, memo = False, {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain != "" or node.op_type != "Reshape" or len(node.inputs) < 2:
            continue
        out, data = node.outputs[0], node.inputs[0]
        if not isinstance(out.type, ir.TensorType):
            continue
        if out.shape is not None and all(isinstance(d, int) for d in out.shape):
            continue
        target = shape_tensor(node.inputs[1], memo=memo)
        if target is None:
            continue
        dims = _reshape_dims(target, data.shape, node.attributes.get_int("allowzero", 0))
        if dims is None:
            continue
        if out.shape is None:
            out.shape = ir.Shape(dims)
            changed = True
        elif len(out.shape) == len(dims) and any(isinstance(new, int) and not isinstance(old, int) for old, new in zip(out.shape, dims)):
            out.shape = ir.Shape([new if isinstance(new, int) else old for old, new in zip(out.shape, dims)])
            changed = True
    return changed


def _reshape_dims(target: list[Dim], source: ir.Shape | None, allowzero: int) -> list | None:
    dims: list = []
    for axis, size in enumerate(target):
        if size == 0 and not allowzero:
            if source is None or axis >= len(source):
                return None
            size = source[axis] if isinstance(source[axis], int) else source[axis].value
        dims.append(size)
    if dims.count(-1) > 1 or any(isinstance(d, int) and d < -1 for d in dims):
        return None
    if -1 in dims:
        dims[dims.index(-1)] = _inferred_size([d for d in dims if d != -1], source)
    return [d if d is not None else ir.SymbolicDim(None) for d in dims]


def _inferred_size(known: list[Dim], source: ir.Shape | None) -> int | None:
    """The size a Reshape's -1 takes: the input's element count over the other sizes. Named
    sizes cancel against the same names in the input; what is left must be static."""
    if source is None or any(d is None for d in known):
        return None
    names = [d.value if not isinstance(d, int) else None for d in source]
    if any(isinstance(d, ir.SymbolicDim) and d.value is None for d in source):
        return None
    left = [n for n in names if n is not None]
    for d in known:
        if isinstance(d, str):
            if d not in left:
                return None
            left.remove(d)
    if left:
        return None
    total = int(np.prod([d for d in source if isinstance(d, int)]))
    rest = int(np.prod([d for d in known if isinstance(d, int)]))
    return total // rest if rest and total % rest == 0 else None
