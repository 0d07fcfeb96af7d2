"""Token-mixer swaps (approximate): replace canonical attention ops by cheaper mixers.

The graph edit only; what to swap, with which parameters, is decided by calibration
(graphopt/mixing.py), which also measures the fidelity of every swap. Mixers and their
reference bodies: graphopt/mixer_bodies.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt import banded_bodies, functions, mixer_bodies
from graphopt.attention import is_canonical
from graphopt.errors import InputError
from graphopt.ir import common_passes, ir
from graphopt.masks import HIDDEN
from graphopt.passes import mixer_state
from graphopt.passes._edits import replace_value
from graphopt.passes._weights import add_initializer, const_array
from graphopt.registry import register_approximate
from graphopt.rewrite import RULE_TAG
from graphopt.steps import Approximation, ApproximateStep, Options

RULE = "SwapMixer"
MIXERS = ("linear:elu", "linear:relu", "linear:relu+dwc", "linear:hedgehog", "linear:performer", "window", "hybrid",
          "pool", "drop")
SINKS = 4  # causal layers keep the first tokens visible in window attention (attention sinks)


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    kind: str  # "linear", "window", "hybrid", "pool", "drop"
    feature_map: str | None = None  # Elu, Relu, Hedgehog, Performer
    dwc: bool = False  # SLAB's depthwise convolution branch on V, added to the linear attention

    @classmethod
    def parse(cls, text: str) -> MixerSpec:
        if text not in MIXERS:
            raise InputError(f"unknown mixer '{text}'", hint=f"choose from {', '.join(MIXERS)}")
        kind, _, fmap = text.partition(":")
        fmap, _, branch = fmap.partition("+")
        return cls(kind, fmap.capitalize() or None, branch == "dwc")

    @property
    def name(self) -> str:
        base = f"{self.kind}:{self.feature_map.lower()}" if self.feature_map else self.kind
        return base + ("+dwc" if self.dwc else "")

    @property
    def has_weights(self) -> bool:
        return self.feature_map in ("Hedgehog", "Performer")


def attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    """Canonical attention ops in graph order: layer i is the i-th."""
    return [n for n in graph if is_canonical(n)]


def initial_weights(spec: MixerSpec, node: ir.Node, layer: int, seed: int = 0) -> np.ndarray | None:
    """Hedgehog: identity per head [H, D, D]; Performer: Gaussian features [D, 4 D], seeded per layer."""
    heads, size = node.attributes.get_int("q_num_heads", 0), node.attributes.get_int("head_size", 0)
    if spec.feature_map == "Hedgehog":
        if not heads or not size:
            raise InputError(f"attention '{node.name}' has unknown heads or head size; Hedgehog needs them")
        return np.tile(np.eye(size, dtype=np.float32), (heads, 1, 1))
    if spec.feature_map == "Performer":
        if not size:
            raise InputError(f"attention '{node.name}' has an unknown head size; Performer needs it")
        return np.random.default_rng(seed * 1000 + layer).standard_normal((size, 4 * size)).astype(np.float32)
    return None


def sinks_for(node: ir.Node) -> int:
    return SINKS if node.attributes.get_int("causal", 0) else 0


def swap(model: ir.Model, node: ir.Node, spec: MixerSpec, weights=None, *, quadratic: bool = False,
         layer: int | None = None) -> str:
    """Replace one canonical attention op by `spec`'s mixer; returns what was done. `weights`:
    the feature-map matrix (Hedgehog, Performer) or the window size (window). A causal linear
    mixer on a layer that reads a KV cache carries a state instead (named after `layer`)."""
    graph = model.graph
    new: list[ir.Node] = []
    if spec.kind == "drop":
        done = _drop(graph, node, new)
    else:
        q, kt, v = node.inputs[:3]
        if spec.kind == "pool":
            op = "CausalPoolMixer" if node.attributes.get_int("causal", 0) else "PoolMixer"
            call = ir.node(op, [q, v], domain=functions.DOMAIN, name=f"{node.name}_pool")
            done = f"{op} over the value tokens"
        elif spec.kind in ("window", "hybrid"):
            window = int(weights["window"])
            attrs = {"scale": ir.AttrFloat32("scale", node.attributes.get_float("scale", 1.0)),
                     "window": ir.AttrInt64("window", window), "sinks": ir.AttrInt64("sinks", sinks_for(node))}
            params = []
            if spec.kind == "hybrid":
                params = [add_initializer(graph, None, weights["W"], f"hybrid_w_{node.name}"),
                          add_initializer(graph, None, weights["gamma"], f"hybrid_gamma_{node.name}")]
            banded = weights.get("mask_only") and _same_length(q, kt) and mixer_state.find_caches(node) is None
            causal = bool(node.attributes.get_int("causal", 0))
            if banded:  # only the band is scored: linear in the sequence length
                keymask = _keymask(graph, new, node.inputs[3] if len(node.inputs) > 3 else None)
                op = (banded_bodies.window_name if spec.kind == "window" else banded_bodies.hybrid_name)(causal)
                inputs = [q, kt, v, keymask, *params]
            else:  # every score, masked (a bias with values, a KV cache, or lengths not known equal)
                op = "WindowAttention" if spec.kind == "window" else "HybridAttention"
                inputs = [q, kt, v, _bias_or_zero(graph, node), *params]
            call = ir.node(op, inputs, domain=functions.DOMAIN, name=f"{node.name}_{spec.kind}", attributes=attrs)
            done = f"{op} (window {window}, sinks {sinks_for(node)})"
        else:
            causal = bool(node.attributes.get_int("causal", 0))
            caches = mixer_state.find_caches(node) if causal else None
            kept = mixer_state.why_not(node, caches) if caches is not None else None
            if caches is not None and spec.dwc:
                kept = "the depthwise-conv branch needs the last values, which the state does not carry"
            keymask = _keymask(graph, new, node.inputs[3] if len(node.inputs) > 3 else None)
            params = []
            if spec.has_weights:
                params.append(add_initializer(graph, None, weights, f"{spec.feature_map.lower()}_{node.name}"))
            attrs = {"scale": ir.AttrFloat32("scale", node.attributes.get_float("scale", 1.0))}
            if caches is not None and kept is None:
                return _swap_recurrent(model, node, spec, caches, keymask, params, attrs, new, layer)
            name = mixer_bodies.linear_name(spec.feature_map, causal, quadratic, past=not _same_length(q, kt))
            call = ir.node(name, [q, kt, v, keymask, *params], domain=functions.DOMAIN, name=f"{node.name}_linear",
                           attributes=attrs)
            done = name + (f" (keeps its KV cache: {kept})" if kept else "")
            if spec.dwc:
                call = _add_token_conv(graph, node, new, call, keymask, weights, causal)
                done += " + " + call.inputs[1].producer().op_type
        new.append(call)
        _replace(graph, node, call.outputs[0])
    _finish(model, node, new)
    return done


def _add_token_conv(graph, node, new, linear: ir.Node, keymask, weights, causal: bool) -> ir.Node:
    """SLAB's depthwise-conv branch: Add(linear attention, TokenConv(V)); returns the Add."""
    op = "CausalTokenConv" if causal else "TokenConv"
    kernel = add_initializer(graph, None, weights, f"dwc_{node.name}")
    conv = ir.node(op, [node.inputs[0], node.inputs[2], keymask, kernel], domain=functions.DOMAIN,
                   name=f"{node.name}_dwc")
    new.extend([linear, conv])
    return ir.node("Add", [linear.outputs[0], conv.outputs[0]], name=f"{node.name}_linear_dwc")


def initial_conv(node: ir.Node) -> np.ndarray:
    """The depthwise kernel [H, K, Dv], zeros: before fitting, the branch adds nothing."""
    heads, size = node.attributes.get_int("q_num_heads", 0), node.attributes.get_int("head_size", 0)
    if not heads or not size:
        raise InputError(f"attention '{node.name}' has unknown heads or head size; the dwc branch needs them")
    return np.zeros((heads, mixer_bodies.CONV_KERNEL, size), np.float32)


def _finish(model: ir.Model, node: ir.Node, new: list[ir.Node]) -> None:
    for n in new:
        n.metadata_props[RULE_TAG] = RULE
    if new:
        model.graph.insert_before(node, new)
    common_passes.RemoveUnusedNodesPass()(model)
    functions.ensure(model)


def _swap_recurrent(model, node, spec, caches, keymask, params, attrs, new, layer) -> str:
    """Causal linear attention reading a KV cache: the cache becomes a state (passes/mixer_state.py)."""
    graph = model.graph
    if layer is None:
        raise ValueError("swapping a layer that reads a KV cache needs its layer index (it names the state)")
    kt_new = mixer_state.clone_for_new_tokens(caches[0], new)
    v_new = mixer_state.clone_for_new_tokens(caches[1], new)
    q = node.inputs[0]
    heads = node.attributes.get_int("q_num_heads", 0)
    size = node.attributes.get_int("head_size", 0)
    if not heads or not size:
        raise InputError(f"attention '{node.name}' has unknown heads or head size; its recurrent state needs them")
    dv = node.inputs[2].shape[-1] if node.inputs[2].shape is not None else size
    dv = dv if isinstance(dv, int) else size
    features = {"Hedgehog": 2 * size, "Performer": params[0].shape[-1] if params else 0}.get(spec.feature_map, size)
    batch = caches[0].past.shape[0]
    state, normalizer = mixer_state.state_inputs(graph, layer, batch, heads, features, dv)

    def add(op, inputs, **kw):
        n = ir.node(op, inputs, attributes=kw)
        new.append(n)
        return n.outputs[0]

    # the key mask of the new tokens: the last S of the mask over past + new keys
    s_len = add("Shape", [v_new], start=-2, end=-1)
    start = add("Neg", [s_len])
    end = add_initializer(graph, None, np.array([np.iinfo(np.int64).max], np.int64), "mask_end")
    axis = add_initializer(graph, None, np.array([2], np.int64), "mask_token_axis")
    keymask_new = add("Slice", [keymask, start, end, axis])
    name = mixer_bodies.recurrent_name(spec.feature_map)
    call = ir.node(name, [q, kt_new, v_new, keymask_new, state, normalizer, *params], domain=functions.DOMAIN,
                   name=f"{node.name}_recurrent", attributes=attrs, num_outputs=3)
    new.append(call)
    _replace(graph, node, call.outputs[0])
    mixer_state.state_outputs(graph, call, layer, state, normalizer)
    _finish(model, node, new)
    mixer_state.release(model, caches)
    return f"{name} (KV cache -> {state.name}, {normalizer.name})"


def _same_length(q: ir.Value, kt: ir.Value) -> bool:
    """Queries and keys are statically the same tokens count (S == T: no past, no cross attention)."""
    if q.shape is None or kt.shape is None or len(q.shape) < 2 or len(kt.shape) < 1:
        return False
    s, t = q.shape[-2], kt.shape[-1]
    if isinstance(s, int) or isinstance(t, int):
        return s == t
    return s.value is not None and s.value == t.value


def _bias_or_zero(graph: ir.Graph, node: ir.Node) -> ir.Value:
    if len(node.inputs) > 3:
        return node.inputs[3]
    return add_initializer(graph, None, np.zeros((1, 1, 1, 1), np.float32), "no_bias")


def _replace(graph: ir.Graph, node: ir.Node, value: ir.Value) -> None:
    replace_value(graph, node.outputs[0], value)


def _keymask(graph: ir.Graph, new: list[ir.Node], bias: ir.Value | None, *, pushdown: bool = True) -> ir.Value:
    """[B|1, 1, T, 1]: 1 where the last query may see the key (padding masks hide the same keys
    from every query; a causal mask hides none from the last one), else 0. With `pushdown`,
    the last row is taken before the elementwise ops that build the bias (so a causal model
    no longer materializes its [S, T] mask: linear time and memory)."""
    if bias is None:
        return add_initializer(graph, None, np.ones((1, 1, 1, 1), np.float32), "keymask_ones")

    def add(op, inputs, **attrs):
        n = ir.node(op, inputs, attributes=attrs)
        new.append(n)
        return n.outputs[0]

    row = _last_row(graph, add, bias, 12) if pushdown else _slice_last_row(graph, add, bias)
    threshold = add_initializer(graph, None, np.array(HIDDEN, np.float32), "mask_hidden")
    visible = add("Cast", [add("Greater", [row, threshold])], to=ir.DataType.FLOAT)
    if graph.opset_imports.get("", 18) >= 18:
        heads_axis = add_initializer(graph, None, np.array([1], np.int64), "mask_heads")
        combined = add("ReduceMin", [visible, heads_axis], keepdims=1)
    else:  # opset 13-17: axes is an attribute
        combined = add("ReduceMin", [visible], keepdims=1, axes=[1])
    return add("Transpose", [combined], perm=[0, 1, 3, 2])


# Elementwise ops with broadcasting: the last row of op(a, b, ..) is op(last row of each input).
_ROWWISE = frozenset({"Where", "And", "Or", "Xor", "Not", "Add", "Sub", "Mul", "Div", "Equal", "Less", "LessOrEqual",
                      "Greater", "GreaterOrEqual", "Cast", "Neg", "Abs", "Max", "Min"})


def _last_row(graph, add, value: ir.Value, depth: int) -> ir.Value:
    """value[..., -1:, :] (rank >= 2), computed as early as the elementwise producers allow."""
    shape = value.shape
    if shape is None or len(shape) < 2:
        return _slice_last_row(graph, add, value)
    if shape[-2] == 1:
        return value  # broadcast along the query axis already
    node = value.producer()
    if depth == 0 or node is None or node.domain != "" or node.op_type not in _ROWWISE or len(node.outputs) != 1:
        return _slice_last_row(graph, add, value)
    inputs = []
    for x in node.inputs:
        if x is None or x.shape is None:
            return _slice_last_row(graph, add, value)
        # an input of lower rank broadcasts along the query axis (axis -2 of the output)
        inputs.append(x if len(x.shape) < 2 else _last_row(graph, add, x, depth - 1))
    return add(node.op_type, inputs, **{k: a.value for k, a in node.attributes.items()})


def _slice_last_row(graph, add, value: ir.Value) -> ir.Value:
    last = add_initializer(graph, None, np.array([-1], np.int64), "mask_last")
    end = add_initializer(graph, None, np.array([np.iinfo(np.int64).max], np.int64), "mask_end")
    axis = add_initializer(graph, None, np.array([-2], np.int64), "mask_axis")
    return add("Slice", [value, last, end, axis])


def _nan_guard(value: ir.Value) -> ir.Value | None:
    """The output of Where(IsNaN(value), 0, value) when that is all that reads `value`."""
    readers = [n for n, _ in value.uses()]
    if len(readers) != 2 or value.is_graph_output():
        return None
    isnan = next((n for n in readers if n.op_type == "IsNaN"), None)
    where = next((n for n in readers if n.op_type == "Where"), None)
    if isnan is None or where is None or where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not value:
        return None
    return where.outputs[0]


def residual_add(node: ir.Node) -> tuple[ir.Node, ir.Value, ir.Value] | None:
    """(the residual Add, the residual stream X, the attention branch A) that the canonical
    op's output path (NaN guard, layout ops, output projection, bias) feeds, or None."""
    value = node.outputs[0]
    for _ in range(10):
        guard = _nan_guard(value)
        if guard is not None:
            value = guard
            continue
        readers = value.uses()
        if len(readers) != 1 or value.is_graph_output():
            return None
        reader, _index = readers[0]
        if reader.op_type == "Add" and reader.domain == "":
            other = reader.inputs[1] if reader.inputs[0] is value else reader.inputs[0]
            if const_array(other) is None:  # the residual stream
                return reader, other, value
        value = reader.outputs[0]
    return None


def _drop(graph: ir.Graph, node: ir.Node, new: list[ir.Node]) -> str:
    """The attention sub-layer becomes the identity on the residual stream: the residual Add
    that its output path feeds is bypassed."""
    found = residual_add(node)
    if found is not None:
        add, residual, _branch = found
        replace_value(graph, add.outputs[0], residual)
        return f"dropped: residual Add '{add.name}' bypassed"
    # No residual Add found: the mixer outputs zeros (the projection's bias still adds).
    shape = ir.node("Shape", [node.inputs[0]])
    zeros = ir.node("ConstantOfShape", [shape.outputs[0]],
                    attributes={"value": ir.AttrTensor("value", ir.tensor(np.zeros(1, np.float32)))})
    new.extend([shape, zeros])
    _replace(graph, node, zeros.outputs[0])
    return "dropped: no residual Add found; the attention output is zero"


class SwapMixers(ApproximateStep):
    """Swap softmax attention layers for a calibrated token mixer (graphopt/mixing.py)."""

    name = "swap-mixers"

    def __init__(self, mixer: str, options: Options) -> None:
        super().__init__(options)
        self.spec = MixerSpec.parse(mixer)  # an unknown mixer fails before any work

    def approximate(self, model) -> Approximation:
        from graphopt.mixing import swap_mixers

        o = self.options
        mixed = swap_mixers(model, self.spec.name, calib=o.calib, layers=o.layers, fidelity=o.fidelity, steps=o.calib_steps,
                            seed=o.seed, dims=o.dims)
        return Approximation(mixed.model, {RULE: len(mixed.report["layers_swapped"])}, mixed.report,
                             mixed.convert and mixed.feeds_for)


register_approximate("mixer", SwapMixers)
