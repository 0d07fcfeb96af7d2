"""Precondition helpers shared by rules. Each returns None when the condition
holds, or a reason (a sentence naming the value) when it does not."""

from __future__ import annotations

from graphopt.ir import ir
from graphopt.passes._weights import const_array


def forwarding_blocker(source: ir.Value, replaced: ir.Value) -> str | None:
    """Why `replaced` cannot be substituted by `source` (deleting its producer), or None.

    onnxscript's replacement hands `replaced`'s name to `source`. That renames the
    model's interface when `source` is a graph input or an initializer, and merges
    two outputs into one when both are graph outputs. A subgraph (an If branch, a Loop
    or Scan body) cannot return a value of an enclosing graph directly: onnxruntime
    refuses such a model ("an outer scope value being returned directly"), so an
    Identity that returns an outer value from a subgraph stays. (fold-constants
    forwards initializers through Identity itself.)
    """
    if source.is_graph_input():
        return f"'{source.name}' is a graph input; forwarding it would rename it to '{replaced.name}'"
    if source.is_initializer():
        return f"'{source.name}' is an initializer; forwarding it would rename it to '{replaced.name}'"
    if replaced.is_graph_output() and source.is_graph_output():
        return f"'{replaced.name}' and '{source.name}' are both graph outputs"
    if replaced.is_graph_output() and _owner(source) is not _owner(replaced):
        return f"'{replaced.name}' is a subgraph output and '{source.name}' comes from an enclosing graph"
    return None


def _owner(value: ir.Value) -> ir.Graph | None:
    """The graph that defines `value`: its producer's, or the graph it is an input of."""
    node = value.producer()
    return node.graph if node is not None else value.graph


def inference_batchnorm_blocker(bn: ir.Node) -> str | None:
    """BatchNormalization in inference form: one output, training_mode 0."""
    if len(bn.outputs) != 1 or bn.attributes.get_int("training_mode", 0) != 0:
        return f"BatchNormalization '{bn.name}' is in training mode"
    return None


def single_reader_blocker(value: ir.Value, reader: ir.Node) -> str | None:
    """`value` is read only by `reader` (so the producer can be rewritten away)."""
    if value.is_graph_output():
        return f"'{value.name}' is also a graph output"
    others = [n for n, _ in value.uses() if n is not reader]
    if others:
        return f"'{value.name}' has {len(others)} other reader(s), e.g. '{others[0].name}' ({others[0].op_type})"
    return None


class ConvGeometry:
    """Spatial attributes of a Conv/pooling node with explicit padding."""

    def __init__(self, node: ir.Node, kernel: tuple[int, ...]):
        rank = len(kernel)
        attrs = node.attributes
        self.kernel = kernel
        self.strides = tuple(attrs.get_ints("strides", (1,) * rank))
        self.dilations = tuple(attrs.get_ints("dilations", (1,) * rank))
        pads = tuple(attrs.get_ints("pads", (0,) * 2 * rank))
        self.begin, self.end = pads[:rank], pads[rank:]
        self.group = attrs.get_int("group", 1)
        self.auto_pad = attrs.get_string("auto_pad", "NOTSET")

    def explicit_padding_blocker(self) -> str | None:
        if self.auto_pad not in ("NOTSET", "VALID"):
            return f"auto_pad={self.auto_pad} (only explicit pads are handled)"
        return None

    def is_same_size(self) -> bool:
        """Stride 1 and centred 'same' padding: output grid == input grid, centre tap aligned."""
        return all(s == 1 for s in self.strides) and all(
            k % 2 == 1 and b == e == d * (k - 1) // 2
            for k, b, e, d in zip(self.kernel, self.begin, self.end, self.dilations)
        )


def scalar(value: ir.Value | None) -> float | None:
    """The value as a Python float if it is a constant with exactly one element."""
    array = const_array(value)
    return None if array is None or array.size != 1 else float(array.reshape(()))


def constant_blocker(value: ir.Value | None, expected: float, role: str, rtol: float = 1e-6) -> str | None:
    """`value` is a scalar constant equal to `expected` (to float32 rounding)."""
    got = scalar(value)
    if got is None:
        return f"{role} '{getattr(value, 'name', None)}' is not a scalar constant"
    if abs(got - expected) > rtol * abs(expected):
        return f"{role} is {got!r}, the identity needs {expected!r}"
    return None


def reduced_axes(node: ir.Node) -> tuple[int, ...] | None:
    """The axes a reduction reduces, normalized; None when unknown or all (no axes)."""
    rank = None if node.inputs[0].shape is None else len(node.inputs[0].shape)
    if rank is None:
        return None
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = const_array(node.inputs[1])
        axes = None if array is None else [int(a) for a in array.reshape(-1)]
    if not axes:
        return None
    return tuple(sorted(a % rank for a in axes))


def last_axis_blocker(reduce: ir.Node, data: ir.Value) -> str | None:
    """A ReduceMean over the last axis only, keeping dims (axes as attribute or input)."""
    if reduce.attributes.get_int("keepdims", 1) != 1:
        return f"ReduceMean '{reduce.name}' drops the reduced axis"
    if "axes" in reduce.attributes:
        axes = list(reduce.attributes.get_ints("axes"))
    elif len(reduce.inputs) > 1 and reduce.inputs[1] is not None:
        array = const_array(reduce.inputs[1])
        if array is None:
            return f"ReduceMean '{reduce.name}' has non-constant axes"
        axes = [int(a) for a in array.reshape(-1)]
    else:
        return f"ReduceMean '{reduce.name}' reduces every axis"
    rank = None if data.shape is None else len(data.shape)
    if len(axes) != 1 or not (axes[0] == -1 or (rank is not None and axes[0] == rank - 1)):
        return f"ReduceMean '{reduce.name}' reduces axes {axes}, not only the last one"
    return None


def opset_of(value: ir.Value) -> int:
    """The default-domain opset of the graph holding `value`."""
    graph = value.graph
    imports = graph.opset_imports if graph is not None else {}
    return imports.get("", imports.get("ai.onnx", 0))
