"""graphopt's high-level ops: model-local ONNX functions in the `graphopt` domain.

Each has a reference body in standard ONNX ops, written for the model's opset, so every
intermediate model still runs in onnxruntime (which inlines the body). Backends may swap a call
for a faster kernel. Rules emit calls; `ensure` (run by every pass that fired) adds the
definitions the model is missing.

Bodies are Python, traced by onnxscript's builder (`onnxscript.build_function`): a body is a
function `(op, c, *inputs) -> output(s)` where `op` builds ONNX nodes and `c` (a `Body`) holds
the model's opset, whether every call is float32 (`c.plain`), and helpers for constants,
attribute references and the opset-dependent reductions. Per-opset variants are branches on
`c.opset`; families register their bodies with `@define` when imported (graphopt/library/ for
norms, activations and canonical attention; passes/mixers/ for the token mixers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnxscript

from graphopt import families, ops
from graphopt.ir import ir

DOMAIN = ops.GRAPHOPT_DOMAIN
VERSION = 1
CASTLIKE_OPSET = 15  # below it a body cannot cast constants to x's type: float32 only
AXES_INPUT_OPSET = 18  # ReduceMean/Max/Min take axes as an input from here (ReduceSum from 13)

FLOAT, INT, STRING = ir.AttributeType.FLOAT, ir.AttributeType.INT, ir.AttributeType.STRING


class Body:
    """The context a body builder gets besides the op builder."""

    def __init__(self, op, opset: int, plain: bool) -> None:
        self.op, self.opset, self.plain = op, opset, plain

    def f32(self, value: float | Sequence[float]) -> ir.Value:
        """A float32 constant (a `value` tensor: the form every consumer's converter reads)."""
        return self.op.Constant(value=ir.tensor(np.array(value, np.float32)))

    def i64(self, value: int | Sequence[int]) -> ir.Value:
        """An int64 constant: a scalar for an int, 1-D for a list."""
        return self.op.Constant(value=ir.tensor(np.array(value, np.int64)))

    def like(self, constant: ir.Value, x: ir.Value) -> ir.Value:
        """`constant` in the element type of `x`. With `plain` (every call is float32, or the
        opset has no CastLike) the float32 constant itself: onnxruntime can then fold it and
        its own fusions (GeluFusion, FastGeluFusion) still match the inlined body."""
        return constant if self.plain or self.opset < CASTLIKE_OPSET else self.op.CastLike(constant, x)

    def attr(self, name: str, kind: ir.AttributeType = FLOAT) -> ir.Value:
        """A constant holding the function's attribute `name` (a reference, filled per call)."""
        field = {FLOAT: "value_float", INT: "value_int"}[kind]
        return self.op.Constant(**{field: ir.RefAttr(field, name, kind)})

    def reduce(self, kind: str, x: ir.Value, axes: Sequence[int], keepdims: int = 1) -> ir.Value:
        """Reduce{kind} over `axes`: axes as an input where the opset takes one, else an attribute."""
        takes_input = self.opset >= (13 if kind == "Sum" else AXES_INPUT_OPSET)
        op = getattr(self.op, f"Reduce{kind}")
        return op(x, self.i64(list(axes)), keepdims=keepdims) if takes_input else op(x, axes=list(axes), keepdims=keepdims)


@dataclasses.dataclass(frozen=True)
class FunctionDef:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: tuple[tuple[str, ir.AttributeType], ...]
    body: Callable[..., Any]  # (op, Body, *inputs) -> output value(s)


LIBRARY: dict[str, FunctionDef] = {}


def define(name: str, inputs: Sequence[str], *, outputs: Sequence[str] = ("Y",),
           attributes: Sequence[tuple[str, ir.AttributeType]] = ()) -> Callable:
    """Decorator: register `fn(op, c, *inputs)` as the body of graphopt function `name`."""

    def register(fn: Callable) -> Callable:
        if name in LIBRARY and LIBRARY[name].body is not fn:
            raise ValueError(f"graphopt function {name!r} is defined twice")
        LIBRARY[name] = FunctionDef(name, tuple(inputs), tuple(outputs), tuple(attributes), fn)
        return fn

    return register


def op_id(name: str) -> ops.OpId:
    return ops.OpId(DOMAIN, name)


def call_blocker(x: ir.Value, opset: int) -> str | None:
    """Why a graphopt function cannot be called on `x` at this opset, or None."""
    if opset < CASTLIKE_OPSET and x.dtype != ir.DataType.FLOAT:
        return f"below opset {CASTLIKE_OPSET} graphopt functions are float32-only and '{x.name}' is {x.dtype}"
    return None


def definition(name: str) -> FunctionDef:
    if name not in LIBRARY:
        families.load()  # bodies register when their family is imported
    return LIBRARY[name]


def build(name: str, opset: int, plain: bool = False) -> ir.Function:
    """The function `name` for a model of default-domain `opset`; `plain`: every call is float32."""
    fd = definition(name)
    fn = onnxscript.build_function(
        lambda op, *xs: fd.body(op, Body(op, opset, plain), *xs),
        [ir.Value(name=n) for n in fd.inputs],
        domain=DOMAIN,
        name=name,
        attributes=[ir.Attr(n, kind, None) for n, kind in fd.attributes],
        opset_imports={"": opset},
    )
    for value, out in zip(fn.outputs, fd.outputs):
        value.name = out
    for node in fn:
        node.metadata_props.clear()  # the builder's scope notes: noise in every saved model
    return fn


def ensure(model: ir.Model) -> list[str]:
    """Add the definitions of every graphopt function the graph calls but lacks."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 18))
    calls: dict[str, list[ir.Node]] = {}
    for n in ir.traversal.RecursiveGraphIterator(model.graph):
        if n.domain == DOMAIN:
            calls.setdefault(n.op_type, []).append(n)
    if calls and any(name not in LIBRARY for name in calls):
        families.load()
    added = []
    for name, nodes in sorted(calls.items()):
        if name in LIBRARY and (DOMAIN, name, "") not in model.functions:
            plain = all(n.inputs[0] is not None and n.inputs[0].dtype == ir.DataType.FLOAT for n in nodes)
            fn = build(name, opset, plain)
            model.functions[fn.identifier()] = fn
            added.append(name)
    if calls:
        model.opset_imports.setdefault(DOMAIN, VERSION)
    return added
