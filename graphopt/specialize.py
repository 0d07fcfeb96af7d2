"""Shape specialization: bind a model's symbolic input dims to concrete sizes, then fold.

Exporters compute reshape targets at run time (Shape -> Gather -> Concat); with every
input shape static, shape inference makes those values known and constant folding turns
the chains into constants. Compilers that want static shapes (TVM's ONNX frontend fails
on some dynamic Reshapes) get a model without them. Fills of a now-constant shape
(ConstantOfShape: legacy exports build their masks from them, some 0-d, which TVM's frontend
cannot broadcast) become constants too, so the shape arithmetic after them folds, and a Pad
whose pads were computed at run time gets constant pads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from graphopt import ops, registry
from graphopt.errors import InputError
from graphopt.ir import ir
from graphopt.model import Model
from graphopt.shapes import infer_shapes


def parse_shapes(text: str) -> dict[str, tuple[int, ...]]:
    """'input_ids=1x128,attention_mask=1x128' -> {name: (1, 128)}."""
    shapes = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name.strip()] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise InputError(f"cannot read the shape '{item}'", hint="write name=1x128 (dims joined by x), comma-separated") from None
    return shapes


def specialize(model: Model, shapes: Mapping[str, Sequence[int]]) -> Model:
    """A copy of `model` whose runtime inputs have the given static shapes, folded.
    Inputs not named keep their shapes, which must then be static already."""
    work = model.clone()
    graph = work.ir.graph
    inputs = {v.name: v for v in graph.inputs if not v.is_initializer()}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise InputError(f"--shapes names {', '.join(unknown)}, which the model does not take",
                         hint=f"model inputs: {', '.join(inputs)}")
    for name, value in inputs.items():
        dims = shapes.get(name)
        declared = list(value.shape) if value.shape is not None else None
        if dims is None:
            if declared is None or not all(isinstance(d, int) for d in declared):
                raise InputError(f"input '{name}' has symbolic dims {_show(declared)}",
                                 hint=f"give its sizes, e.g. --shapes {name}=" + "x".join(
                                     str(d) if isinstance(d, int) else "N" for d in (declared or ["N"])))
            continue
        if declared is not None and (len(declared) != len(dims) or any(
                isinstance(d, int) and d != s for d, s in zip(declared, dims))):
            raise InputError(f"shape {'x'.join(map(str, dims))} for input '{name}' does not fit its declared shape {_show(declared)}")
        value.shape = ir.Shape(list(dims))
    for node in graph:  # forget inferred symbolic shapes: inference recomputes them from the static inputs
        for out in node.outputs:
            out.shape = None
    infer_shapes(work.ir)
    for _ in range(8):  # fills unlock folding, folding unlocks fills and shapes, shapes unlock folding
        for name in ("fold-constants", "eliminate-dead-code"):
            registry.get(name)(work.ir)
        reshaped = infer_shapes(work.ir)  # a Pad whose pads just folded gets a static shape: fold its Shape next
        filled = _materialize_fills(graph)
        if filled:
            infer_shapes(work.ir)
        elif not reshaped:
            break
    return work


FILL_LIMIT = 1 << 16  # elements: larger fills stay ConstantOfShape (their shape is static by now)


def _materialize_fills(graph: ir.Graph) -> int:
    """ConstantOfShape of a constant shape (at most FILL_LIMIT elements) -> Constant."""
    done = 0
    for node in list(graph):
        if (ops.normalize_domain(node.domain), node.op_type) != ops.CONSTANT_OF_SHAPE or node.outputs[0].is_graph_output():
            continue
        shape = ir.convenience.get_const_tensor(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
        if shape is None:
            continue
        dims = [int(d) for d in shape.numpy().reshape(-1)]
        if int(np.prod(dims)) > FILL_LIMIT:
            continue
        fill = node.attributes.get("value")
        element = fill.as_tensor().numpy().reshape(()) if fill is not None else np.float32(0)
        const = ir.node("Constant", [], attributes={"value": ir.tensor(np.full(dims, element, dtype=element.dtype))},
                        name=f"{node.name}_filled")
        const.outputs[0].type, const.outputs[0].shape = node.outputs[0].type, ir.Shape(dims)
        graph.insert_before(node, [const])
        ir.convenience.replace_all_uses_with(node.outputs[0], const.outputs[0])
        graph.remove(node, safe=True)
        done += 1
    return done


def _show(dims) -> str:
    return "[" + ", ".join(str(d if isinstance(d, int) else (d.value or "?")) for d in dims) + "]" if dims is not None else "unknown"
