"""Decoding with causal linear attention: a swapped layer's KV cache becomes a fixed-size state.
(The recurrent body itself, LinearAttention{Map}Recurrent, is in passes/mixers/linear.py.)

A decoder exported with its KV cache computes, per layer, K = Concat(past_k, k_new) and
V = Concat(past_v, v_new) from graph inputs past_*, and returns the Concat outputs as its
present_* outputs. Causal linear attention needs of the past tokens only
    state = sum_j phi(k_j)^T v_j  [B, H, F, Dv]   and   normalizer = sum_j phi(k_j)^T  [B, H, F, 1]
so for a swapped layer i the cache is replaced:
    inputs  past_k, past_v        ->  past_state.i, past_normalizer.i
    outputs present_k, present_v  ->  present_state.i, present_normalizer.i
and the mixer, LinearAttention{Map}Recurrent, reads K and V of the new tokens only: the ops
between each Concat and the attention op (layout ops, GQA's repeat, their shape arithmetic)
are cloned to read the new tokens instead of the concatenation. Memory no longer grows with
the sequence, and one decoding step costs the same at any position.

Preconditions (a layer that breaks one keeps its KV cache, and the report says which):
1. K^T and V of the attention op are computed from Concat(past, new) nodes whose first input
   is a graph input and whose output is a graph output (the cache, rank >= 3), through layout
   ops only (Transpose, Reshape, Expand, Unsqueeze, Squeeze, Identity, Cast), none reshaping to
   a constant that holds the cache length (static-shape exports); every other op in between
   computes shapes (int64, or bool tests on them).
2. Outside that path a Concat output is read only by Shape nodes and as a graph output, and a
   past input only by its Concat and Shape nodes (models read the past length for positions
   and masks).
3. Every layer's past has the same length (true of transformers' caches).
Readers of the past length then get it from a kept layer's cache input, or, when every layer
is swapped, from a new graph input `past_length` (int64 [1]: the number of tokens already in
the state).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt.errors import InputError
from graphopt.ir import common_passes, ir
from graphopt.passes._edits import replace_value
from graphopt.passes._weights import add_initializer, const_array
from graphopt.passes.mixers import edit

LAYOUT = frozenset({"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Identity", "Cast"})
PAST_LENGTH = "past_length"
STATE, NORMALIZER = "past_state", "past_normalizer"
STATE_OUT, NORMALIZER_OUT = "present_state", "present_normalizer"


@dataclasses.dataclass(frozen=True)
class Cache:
    """Concat(past, new) along `axis`, feeding the attention op's input `target`."""

    concat: ir.Node
    axis: int
    target: ir.Value
    past: ir.Value  # kept here: the Concat loses its inputs once removed
    new: ir.Value


def find_caches(node: ir.Node) -> tuple[Cache, Cache] | None:
    """The caches that K^T and V of canonical op `node` read, when both do (precondition 1's
    data path); None when the layer reads no KV cache."""
    found = [_cache_of(node.inputs[i]) for i in (1, 2)]
    if found[0] is None or found[1] is None:
        return None
    return found[0], found[1]


def _cache_of(value: ir.Value) -> Cache | None:
    target, v = value, value
    for _ in range(12):
        node = v.producer()
        if node is None or node.domain != "":
            return None
        if node.op_type == "Concat":  # a KV cache: Concat(past input, new) returned as a present output
            past = node.inputs[0]
            if len(node.inputs) != 2 or not past.is_graph_input() or past.is_initializer() or past.shape is None \
                    or len(past.shape) < 3 or not node.outputs[0].is_graph_output():
                return None
            axis = node.attributes.get_int("axis", 0)
            return Cache(node, axis % len(past.shape), target, past, node.inputs[1])
        if not node.inputs or node.inputs[0] is None:
            return None
        v = node.inputs[0]  # any op: precondition 1 is checked by why_not
    return None


def why_not(node: ir.Node, caches: tuple[Cache, Cache]) -> str | None:
    """The precondition that `node`'s caches break, in words, or None."""
    for cache in caches:
        cone = _cone(cache)
        inside = set(map(id, cone)) | {id(node)}
        total = cache.concat.outputs[0].shape[cache.axis] if cache.concat.outputs[0].shape is not None else None
        for n in cone:
            if n.op_type not in LAYOUT and not all(_is_shape_arithmetic(o) for o in n.outputs):
                return f"precondition 1: '{n.name}' ({n.op_type}) between '{cache.past.name}' and the attention op"
            fixed = const_array(n.inputs[1]) if n.op_type in ("Reshape", "Expand") and len(n.inputs) > 1 else None
            if fixed is not None and isinstance(total, int) and total in fixed.tolist():
                return (f"precondition 1: '{n.name}' ({n.op_type}) has the cache length {total} as a constant "
                        "(a static-shape export: export with a dynamic past length)")
        for reader, _ in cache.concat.outputs[0].uses():
            if id(reader) not in inside and reader.op_type != "Shape":
                return f"precondition 2: '{reader.name}' ({reader.op_type}) reads the concatenated '{cache.past.name}'"
        for n in cone:
            for out in n.outputs:
                for reader, _ in out.uses():
                    if id(reader) not in inside and not all(_is_shape_arithmetic(o) for o in n.outputs):
                        return f"precondition 2: '{reader.name}' reads '{out.name}' on the path from '{cache.past.name}'"
        for reader, _ in cache.past.uses():
            if reader is not cache.concat and reader.op_type != "Shape":
                return f"precondition 2: '{reader.name}' ({reader.op_type}) reads '{cache.past.name}'"
    return None


def _is_shape_arithmetic(value: ir.Value) -> bool:
    return value.dtype in (ir.DataType.INT64, ir.DataType.BOOL)


def _cone(cache: Cache) -> list[ir.Node]:
    """Nodes computed from the Concat output that the attention input depends on, in order."""
    ancestors: dict[int, ir.Node] = {}
    stack = [cache.target]
    while stack:
        value = stack.pop()
        node = value.producer() if value is not None else None
        if node is None or id(node) in ancestors or node is cache.concat:
            continue
        ancestors[id(node)] = node
        stack.extend(node.inputs)
    source = cache.concat.outputs[0]
    reached: set[int] = set()
    cone = []
    graph = cache.concat.graph
    for n in graph:  # graph order is topological
        if id(n) in ancestors and any(x is source or (x is not None and x.producer() is not None and
                                                       id(x.producer()) in reached) for x in n.inputs):
            reached.add(id(n))
            cone.append(n)
    return cone


def clone_for_new_tokens(cache: Cache, new_nodes: list[ir.Node]) -> ir.Value:
    """The attention input computed from the new tokens instead of the concatenated cache."""
    mapping: dict[int, ir.Value] = {id(cache.concat.outputs[0]): cache.new}
    for n in _cone(cache):
        inputs = [mapping.get(id(x), x) if x is not None else None for x in n.inputs]
        clone = ir.node(n.op_type, inputs, attributes={k: a.value for k, a in n.attributes.items()}, domain=n.domain,
                        num_outputs=len(n.outputs), name=f"{n.name}_new_tokens")
        for old, out in zip(n.outputs, clone.outputs):
            mapping[id(old)] = out
            out.dtype = old.dtype
        new_nodes.append(clone)
    return mapping.get(id(cache.target), cache.target)


def state_inputs(graph: ir.Graph, layer: int, batch, heads: int, features: int, dv: int) -> tuple[ir.Value, ir.Value]:
    values = []
    for name, last in ((STATE, dv), (NORMALIZER, 1)):
        value = ir.Value(name=f"{name}.{layer}", shape=ir.Shape([batch, heads, features, last]),
                         type=ir.TensorType(ir.DataType.FLOAT))
        graph.inputs.append(value)
        values.append(value)
    return values[0], values[1]


def state_outputs(graph: ir.Graph, call: ir.Node, layer: int, state: ir.Value, normalizer: ir.Value) -> None:
    for out, name, like in ((call.outputs[1], STATE_OUT, state), (call.outputs[2], NORMALIZER_OUT, normalizer)):
        out.name, out.type, out.shape = f"{name}.{layer}", like.type, like.shape
        graph.outputs.append(out)


def release(model: ir.Model, caches: tuple[Cache, Cache]) -> None:
    """After the attention op no longer reads them: drop the present outputs, give the past
    length to whoever reads it, remove the past inputs."""
    graph = model.graph
    for cache in caches:
        present = cache.concat.outputs[0]
        if present.is_graph_output():
            graph.outputs.remove(present)
    common_passes.RemoveUnusedNodesPass()(model)
    for cache in caches:
        if cache.concat.graph is not None:  # still read: by Shape nodes (precondition 2)
            for reader, _ in list(cache.concat.outputs[0].uses()):
                _replace_shape(graph, reader, cache, with_new=True)
        for reader, _ in list(cache.past.uses()):
            if reader is not cache.concat:
                _replace_shape(graph, reader, cache, with_new=False)
    common_passes.RemoveUnusedNodesPass()(model)
    for cache in caches:
        if not cache.past.uses() and cache.past in graph.inputs:
            graph.inputs.remove(cache.past)


def _replace_shape(graph: ir.Graph, shape_node: ir.Node, cache: Cache, *, with_new: bool) -> None:
    """Shape(past) from the past input's own dims (constants, or the same symbolic dim of another
    graph input) and the past length on the cache axis; Shape(concat) with past length + new
    length there. Nothing computed from the new tokens: the new tokens may depend on the past
    length (positions)."""
    new_nodes: list[ir.Node] = []

    def add(op, inputs, **attrs):
        n = ir.node(op, inputs, attributes=attrs)
        new_nodes.append(n)
        return n.outputs[0]

    parts = []
    for axis, dim in enumerate(cache.past.shape):
        if axis == cache.axis:
            length = _past_length(graph)
            if with_new:
                length = add("Add", [length, add("Shape", [cache.new], start=axis, end=axis + 1)])
            parts.append(length)
        elif isinstance(dim, int):
            parts.append(add_initializer(graph, None, np.array([dim], np.int64), "cache_dim"))
        else:
            parts.append(_symbolic_dim(graph, dim, cache, add))
    full = add("Concat", parts, axis=0)
    start = shape_node.attributes.get_int("start", 0)
    end = shape_node.attributes.get_int("end", None) if "end" in shape_node.attributes else None
    if start or end is not None:
        starts = add_initializer(graph, None, np.array([start], np.int64), "cache_shape_start")
        ends = add_initializer(graph, None, np.array([np.iinfo(np.int64).max if end is None else end], np.int64),
                               "cache_shape_end")
        full = add("Slice", [full, starts, ends])
    graph.insert_before(shape_node, new_nodes)
    full.dtype = ir.DataType.INT64
    shape_node.outputs[0].replace_all_uses_with(full)


def _symbolic_dim(graph: ir.Graph, dim, cache: Cache, add) -> ir.Value:
    for value in graph.inputs:
        if value is cache.past or value.shape is None:
            continue
        for axis, other in enumerate(value.shape):
            if not isinstance(other, int) and other.value is not None and other.value == dim.value:
                return add("Shape", [value], start=axis, end=axis + 1)
    raise InputError(f"the model reads the shape of KV cache input '{cache.past.name}', whose dim '{dim}' no other "
                     "input carries", hint="export with named dynamic dims shared by the inputs (e.g. 'batch')")


def _past_length(graph: ir.Graph) -> ir.Value:
    for value in graph.inputs:
        if value.name == PAST_LENGTH:
            return value
    value = ir.Value(name=PAST_LENGTH, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(value)
    return value


def finish(model: ir.Model) -> None:
    """Once every layer is converted: when a kept layer still reads its KV cache, the past
    length comes from that cache's shape and the `past_length` input goes away."""
    graph = model.graph
    length = next((v for v in graph.inputs if v.name == PAST_LENGTH), None)
    if length is None:
        return
    for past in graph.inputs:
        axis = _cache_axis(past) if past is not length else None
        if axis is not None:
            break
    else:
        return
    shape = ir.node("Shape", [past], attributes={"start": axis, "end": axis + 1}, name=f"{PAST_LENGTH}_from_{past.name}")
    shape.outputs[0].dtype = ir.DataType.INT64
    graph.insert_before(graph.node(0), shape)
    length.replace_all_uses_with(shape.outputs[0])
    graph.inputs.remove(length)


def _cache_axis(value: ir.Value) -> int | None:
    """The concatenation axis when `value` is a kept layer's KV cache input (Concat(value, new))."""
    for reader, index in value.uses():
        if reader.op_type == "Concat" and reader.domain == "" and index == 0 and len(reader.inputs) == 2 \
                and value.shape is not None:
            return reader.attributes.get_int("axis", 0) % len(value.shape)
    return None


def swap_recurrent(b: edit.Builder, spec, caches: tuple[Cache, Cache], keymask: ir.Value, params: list[ir.Value],
                   function: str, layer: int | None) -> str:
    """Causal linear attention reading a KV cache: the cache becomes a state, and `function` (the
    recurrent form of the layer's feature map) reads the new tokens only."""
    node, graph = b.node, b.graph
    if layer is None:
        raise ValueError("swapping a layer that reads a KV cache needs its layer index (it names the state)")
    kt_new = clone_for_new_tokens(caches[0], b.nodes)
    v_new = clone_for_new_tokens(caches[1], b.nodes)
    heads = node.attributes.get_int("q_num_heads", 0)
    size = node.attributes.get_int("head_size", 0)
    if not heads or not size:
        raise InputError(f"attention '{node.name}' has unknown heads or head size; its recurrent state needs them")
    dv = node.inputs[2].shape[-1] if node.inputs[2].shape is not None else size
    dv = dv if isinstance(dv, int) else size
    width = params[0].shape[-1] if params else 0  # Hedgehog: [H, D, F] (2 F features); Performer: [D, F]
    features = {"Hedgehog": 2 * width, "Performer": width}.get(spec.feature_map, size)
    batch = caches[0].past.shape[0]
    state, normalizer = state_inputs(graph, layer, batch, heads, features, dv)
    # the key mask of the new tokens: the last S of the mask over past + new keys
    start = b.add("Neg", [b.add("Shape", [v_new], start=-2, end=-1)])
    end = b.constant(np.array([np.iinfo(np.int64).max], np.int64), "mask_end")
    axis = b.constant(np.array([2], np.int64), "mask_token_axis")
    keymask_new = b.add("Slice", [keymask, start, end, axis])
    outputs = b.call(function, [node.inputs[0], kt_new, v_new, keymask_new, state, normalizer, *params],
                     suffix="recurrent", num_outputs=3, **edit.scale_attr(node))
    replace_value(graph, node.outputs[0], outputs[0])
    state_outputs(graph, outputs[0].producer(), layer, state, normalizer)
    b.install(None)
    release(b.model, caches)
    return f"{function} (KV cache -> {state.name}, {normalizer.name})"
