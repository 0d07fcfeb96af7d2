"""bf16 / fp16 graph conversion: the model computes in 16 bits where that is safe, with its inputs
and outputs kept float32 (a caller feeds and reads what it did before).

Rule, per node in graph order:
    - a standard op outside `ops.KEEP_FLOAT32` runs in the low type: its float inputs are read
      in it (constants converted once, other values through one Cast each) and its float
      outputs are of it (a Cast to float32 becomes a Cast to the low type);
    - an op in `ops.KEEP_FLOAT32` (softmax, norms, reductions, exp / pow / sqrt, Resize's
      float32-only scales, quantization), an op of another domain, and a Constant or
      ConstantOfShape (a source: its readers convert it) keep float32: low inputs are cast back.
    - graph outputs computed in the low type get a Cast to float32 under their own names.
Preconditions:
    1. Every float value is float32 with a known type (shape inference ran); the model has no
       control flow (If / Loop / Scan bodies read outer values by name and keep their types).
The result is approximate: the step that asks for it measures its fidelity. `emulate=True`
writes the same arithmetic in float32 types (every low value rounded through a Cast pair, every
converted constant rounded), which onnxruntime's CPU provider runs as written: its fidelity is
the 16-bit model's on any runtime that stores in 16 bits and accumulates in float32.
"""

from __future__ import annotations

import collections
from typing import Any

import ml_dtypes
import numpy as np

from graphopt import ops
from graphopt.errors import InputError
from graphopt.ir import common_passes, ir
from graphopt.model import Model
from graphopt.passes._weights import add_initializer, const_array
from graphopt.shapes import infer_shapes

TYPES = {"bf16": (ir.DataType.BFLOAT16, ml_dtypes.bfloat16), "fp16": (ir.DataType.FLOAT16, np.float16)}
FLOAT = ir.DataType.FLOAT
SOURCES = frozenset({ops.CONSTANT, ops.CONSTANT_OF_SHAPE})


def _id(node: ir.Node) -> ops.OpId:
    return ops.OpId(ops.normalize_domain(node.domain), node.op_type)


def runs_low(node: ir.Node) -> bool:
    op = _id(node)
    return (op.domain == ops.ONNX_DOMAIN and op not in ops.KEEP_FLOAT32 and op not in SOURCES
            and not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()))


def convert(model: Model, precision: str, *, emulate: bool = False) -> tuple[Model, dict[str, Any]]:
    """A copy of `model` computing in `precision` ("bf16" or "fp16"); and what was done."""
    low, np_low = TYPES[precision]
    if emulate:
        return _emulate(model, precision)
    work = model.clone()
    infer_shapes(work.ir)
    graph = work.ir.graph
    for node in graph.all_nodes():  # precondition 1
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            raise InputError(f"{precision} conversion does not cover control flow: node '{node.name}' ({node.op_type}) "
                             "has a subgraph; use the runtime's precision hint instead (--target cpu)")
    low_copy: dict[int, ir.Value] = {}
    float_copy: dict[int, ir.Value] = {}
    casts = 0

    def cast(value: ir.Value, to: ir.DataType, before: ir.Node) -> ir.Value:
        nonlocal casts
        node = ir.node("Cast", [value], attributes={"to": int(to)}, name=f"{value.name}_to_{precision if to != FLOAT else 'fp32'}")
        node.outputs[0].type, node.outputs[0].shape = ir.TensorType(to), value.shape
        node.outputs[0].name = node.name
        graph.insert_before(before, [node])
        casts += 1
        return node.outputs[0]

    def as_low(value: ir.Value, reader: ir.Node) -> ir.Value:
        if value.dtype == low:
            return value
        if id(value) not in low_copy:
            array = const_array(value)
            if array is not None:
                low_copy[id(value)] = add_initializer(graph, value, array.astype(np_low), precision)
            else:
                low_copy[id(value)] = cast(value, low, reader)
        return low_copy[id(value)]

    def as_float(value: ir.Value, reader: ir.Node) -> ir.Value:
        if id(value) not in float_copy:
            float_copy[id(value)] = cast(value, FLOAT, reader)
        return float_copy[id(value)]

    kept = collections.Counter()
    lowered = 0
    for node in list(graph):
        if runs_low(node):
            for i, value in enumerate(node.inputs):
                if value is not None and value.dtype == FLOAT:
                    node.replace_input_with(i, as_low(value, node))
            touched = False
            for out in node.outputs:
                if out.dtype == FLOAT:  # a new type: a clone shares its types with the original
                    out.type, touched = ir.TensorType(low), True
            if node.op_type == "Cast" and node.attributes.get_int("to") == int(FLOAT):
                node.attributes["to"] = ir.AttrInt64("to", int(low))
                touched = True
            lowered += touched or any(v is not None and v.dtype == low for v in node.inputs)
        else:
            for i, value in enumerate(node.inputs):
                if value is not None and value.dtype == low:
                    node.replace_input_with(i, as_float(value, node))
            if any(v is not None and v.dtype == FLOAT for v in (*node.inputs, *node.outputs)) and _id(node) not in SOURCES:
                kept[str(_id(node))] += 1
    for i, out in enumerate(list(graph.outputs)):
        if out.dtype == low:
            name = out.name
            out.name = f"{name}_{precision}"
            node = ir.node("Cast", [out], attributes={"to": int(FLOAT)}, name=f"{name}_to_fp32")
            node.outputs[0].name, node.outputs[0].type, node.outputs[0].shape = name, ir.TensorType(FLOAT), out.shape
            graph.append(node)
            graph.outputs[i] = node.outputs[0]
            casts += 1
    common_passes.RemoveUnusedNodesPass()(work.ir)
    return work, {"precision": precision, "nodes_in_low_precision": int(lowered), "kept_float32": dict(sorted(kept.items())),
                  "casts": casts}


def _emulate(model: Model, precision: str) -> tuple[Model, dict[str, Any]]:
    """`convert`'s arithmetic in float32 types: low values rounded through Cast pairs."""
    low, np_low = TYPES[precision]
    work = model.clone()
    infer_shapes(work.ir)
    graph = work.ir.graph
    rounded: dict[int, ir.Value] = {}

    def round_trip(value: ir.Value, before: ir.Node | None, after: ir.Node | None) -> ir.Value:
        down = ir.node("Cast", [value], attributes={"to": int(low)}, name=f"{value.name}_round_{precision}")
        up = ir.node("Cast", [down.outputs[0]], attributes={"to": int(FLOAT)}, name=f"{value.name}_rounded")
        down.outputs[0].type, up.outputs[0].type = ir.TensorType(low), ir.TensorType(FLOAT)
        down.outputs[0].shape = up.outputs[0].shape = value.shape
        down.outputs[0].name, up.outputs[0].name = down.name, up.name
        if after is not None:
            graph.insert_after(after, [down, up])
        else:
            graph.insert_before(before, [down, up])
        rounded[id(up.outputs[0])] = up.outputs[0]
        return up.outputs[0]

    copies: dict[int, ir.Value] = {}
    for node in list(graph):
        if not runs_low(node):
            continue
        for i, value in enumerate(node.inputs):
            if value is None or value.dtype != FLOAT or id(value) in rounded:
                continue
            if id(value) not in copies:
                array = const_array(value)
                copies[id(value)] = (add_initializer(graph, value, array.astype(np_low).astype(np.float32), "rounded")
                                     if array is not None else round_trip(value, node, None))
            node.replace_input_with(i, copies[id(value)])
        for out in node.outputs:
            if out.dtype != FLOAT:
                continue
            uses = list(out.uses())
            value = round_trip(out, None, node)
            for reader, index in uses:
                reader.replace_input_with(index, value)
            for j, g in enumerate(graph.outputs):
                if g is out:
                    name = out.name
                    out.name, value.name = f"{name}_unrounded", name
                    graph.outputs[j] = value
    common_passes.RemoveUnusedNodesPass()(work.ir)
    return work, {"precision": precision, "emulated": True}
