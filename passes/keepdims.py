"""Keep reduced dims where the exporter drops them and then puts them back.

jax2tf (Flax) reduces with keepdims=0 and broadcasts the result back with a computed
Reshape and a no-op Expand; the norm, softmax and mean patterns later rules match are
written with keepdims=1, so those forms hide every LayerNorm and softmax of such a model.
"""

from __future__ import annotations

import dataclasses
import itertools

from graphopt import ops
from graphopt.ir import common_passes, ir
from graphopt.passes._checks import reduced_axes
from graphopt.passes._weights import const_array
from graphopt.registry import register
from graphopt.rewrite import RULE_TAG, Pass, PassKind


def _dims(shape: ir.Shape | None) -> list | None:
    """Each dim as an int, a dim name, or None when unnamed (None never equals anything)."""
    return None if shape is None else [d if isinstance(d, int) else d.value for d in shape]


def _same(a, b) -> bool:
    return a is not None and a == b


def _inserted_axes(before: ir.Shape | None, after: ir.Shape | None) -> set[tuple[int, ...]]:
    """Every way of reading `after` as `before` with unit dims inserted: the inserted axes.

    One pair of dims may fail to compare equal (onnx names a batch dim afresh after some ops)
    when every other dim of `before` is a static positive size: a Reshape keeps the element
    count, so that pair is then equal too.
    """
    src, dst = _dims(before), _dims(after)
    if src is None or dst is None or len(dst) <= len(src):
        return set()
    found = set()
    for inserted in itertools.combinations(range(len(dst)), len(dst) - len(src)):
        if any(dst[a] != 1 for a in inserted):
            continue
        kept = [d for a, d in enumerate(dst) if a not in inserted]
        unequal = [i for i, (a, b) in enumerate(zip(src, kept)) if not _same(a, b)]
        if not unequal or (len(unequal) == 1 and all(isinstance(d, int) and d > 0 for i, d in enumerate(src) if i != unequal[0])):
            found.add(inserted)
    return found


@dataclasses.dataclass
class _Restoration:
    """Reshape(v, s) that inserts unit axes into v, optionally followed by a no-op Expand."""

    reshape: ir.Node
    final: ir.Value  # the Expand's output, or the Reshape's
    axes: set[tuple[int, ...]]  # the readings of the Reshape as inserting unit axes


def _restoration(node: ir.Node, index: int) -> _Restoration | None:
    if (node.domain, node.op_type) != ("", "Reshape") or index != 0:
        return None
    out = node.outputs[0]
    axes = _inserted_axes(node.inputs[0].shape, out.shape)
    if not axes or out.is_graph_output():
        return None
    final = out
    uses = list(out.uses())
    if len(uses) == 1 and (uses[0][0].domain, uses[0][0].op_type) == ("", "Expand") and uses[0][1] == 0:
        expand = uses[0][0].outputs[0]
        dims, target = _dims(expand.shape), _dims(out.shape)
        if dims is not None and target is not None and len(dims) == len(target) and all(map(_same, dims, target)) and not expand.is_graph_output():
            final = expand
    return _Restoration(node, final, axes)


def _scalar(value: ir.Value, rank: int) -> bool:
    """A single-element constant that broadcasts without adding dims to a rank-`rank` value."""
    array = const_array(value)
    return array is not None and array.size == 1 and array.ndim <= rank


@dataclasses.dataclass
class _Component:
    reductions: list[ir.Node]
    nodes: list[ir.Node]  # elementwise nodes between the reductions and the restorations
    restorations: list[_Restoration]


def _component(reduction: ir.Node) -> _Component | str:
    """Everything computed from `reduction`'s keepdims=0 output up to where it is broadcast back;
    or why its dims cannot be kept (a reader that needs them dropped)."""
    axes = reduced_axes(reduction)
    if axes is None:
        return f"'{reduction.name}' reduces axes that are not known constants"
    rank = len(reduction.inputs[0].shape) - len(axes)
    reductions, nodes, restorations, seen = [reduction], [], [], {id(reduction)}
    frontier = [reduction]
    while frontier:
        node = frontier.pop()
        # every non-constant input of an elementwise member is a member's output
        if node not in reductions:
            for value in node.inputs:
                if value is None or _scalar(value, rank):
                    continue
                producer = value.producer()
                if producer is None:
                    return f"'{node.name}' combines the reduced value with '{value.name}', a graph input"
                if id(producer) not in seen:
                    if (producer.domain, producer.op_type) in ops.REDUCTIONS and producer.attributes.get_int("keepdims", 1) == 0 and reduced_axes(producer) == axes:
                        reductions.append(producer)
                    elif (producer.domain, producer.op_type) in ops.ELEMENTWISE:
                        nodes.append(producer)
                    else:
                        return f"'{node.name}' combines the reduced value with '{value.name}' from {producer.op_type} '{producer.name}'"
                    seen.add(id(producer))
                    frontier.append(producer)
        for out in node.outputs:
            if out.is_graph_output():
                return f"'{out.name}' is a graph output with the reduced dims dropped"
            for reader, index in out.uses():
                if id(reader) in seen:
                    continue
                restoration = _restoration(reader, index)
                if restoration is not None:
                    if axes not in restoration.axes:
                        return f"Reshape '{reader.name}' inserts unit axes other than the reduced {list(axes)}"
                    restorations.append(restoration)
                    seen.add(id(reader))
                elif (reader.domain, reader.op_type) in ops.ELEMENTWISE:
                    nodes.append(reader)
                    seen.add(id(reader))
                    frontier.append(reader)
                else:
                    return f"'{out.name}' is read by {reader.op_type} '{reader.name}', which needs the reduced dims dropped"
    if not restorations:
        return f"nothing broadcasts '{reduction.outputs[0].name}' back"
    return _Component(reductions, nodes, restorations)


@register
class RestoreKeepDims(Pass):
    """Reduce with keepdims=1 where every use of a keepdims=0 result is broadcast back.

    Math (R a reduction over axes A, f elementwise with scalar constants, U inserting
    unit axes at A):
        U(f(R(x; keepdims=0), ...)) = f(R(x; keepdims=1), ...)
    Preconditions:
        1. The reductions' axes are known constants, the same for every reduction combined.
        2. Every value computed from them is read only by elementwise ops (other operands:
           members or single-element constants) or by a Reshape whose output is its input
           with unit dims inserted exactly at the reduced axes, optionally followed by an
           Expand to that same shape; none is a graph output. Dims compare equal when static
           and equal or of one name; one pair may differ in name when the input's other dims
           are static (the element count, which Reshape keeps, makes them equal).
    """

    name = "restore-keepdims"
    kind = PassKind.EXACT
    requires_shapes = True  # the Reshape targets are compared through inferred shapes
    RULE = "RestoreKeepDims"

    def _components(self, graph: ir.Graph):
        done = set()
        for node in list(graph):
            if (node.domain, node.op_type) not in ops.REDUCTIONS or node.attributes.get_int("keepdims", 1) != 0 or id(node) in done:
                continue
            component = _component(node)
            if isinstance(component, _Component):
                done.update(id(r) for r in component.reductions)
            yield node, component

    def run(self, model: ir.Model) -> dict[str, int]:
        done = 0
        for _, component in list(self._components(model.graph)):
            if isinstance(component, str):
                continue
            for reduction in component.reductions:
                reduction.attributes["keepdims"] = ir.AttrInt64("keepdims", 1)
                reduction.metadata_props[RULE_TAG] = self.RULE
            for node in component.reductions + component.nodes:
                for out in node.outputs:
                    out.shape = None  # inference recomputes the kept dims
            for restoration in component.restorations:
                restoration.final.replace_all_uses_with(restoration.reshape.inputs[0])
            done += len(component.reductions)
        if done:
            common_passes.RemoveUnusedNodesPass()(model)  # the restorations (their readers would block fusions)
        return {self.RULE: done}

    def explain(self, model: ir.Model) -> list[str]:
        return [f"{self.RULE}: {node.op_type} '{node.name}': {component}"
                for node, component in self._components(model.graph) if isinstance(component, str)]
