"""The attention products in int8: Q K^T and P V of each canonical attention call.

Math (per call, Q, K^T, V [.., S|T, D] as the canonical op takes them, P = softmax(scale Q K^T + bias)):
    Y~ = q8(P) q8(V),  P~ = softmax(scale q8(Q) q8(K^T) + bias)
with q8 a QuantizeLinear -> DequantizeLinear pair per tensor: symmetric int8 (zero point 0) for
Q, K and V, which are signed; uint8 from 0 for P, which lies in [0, 1]. A per-tensor q8 commutes
with the layout ops (Reshape, Transpose) between a projection and the op, so Q, K and V are
quantized where the projection writes them: OpenVINO then fuses each quantizer into the
projection's output and runs the fused attention in int8 (what NNCF emits for transformers);
P is quantized inside the op (graphopt::QuantizedMaskedAttention, library/attention.py).
Preconditions:
    1. The call is canonical attention (graphopt::Attention / MaskedAttention), float32.
    2. Each of Q, K^T, V is walked back through Reshape / Transpose / Squeeze / Unsqueeze nodes
       that it alone reads; the quantizer goes on the first value of that chain (it has no other
       reader on the way, so nothing else sees the rounding).
Ranges: per input the clip (max |x|, then percentiles) with the lowest error of the call's output
when only that input is rounded, on calibration rows; P's range is its calibrated maximum.
The error reported is the call's output error with all four rounded. Whether the products go
to int8 is measured on the target like every layer (step.py: the model with and without them).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt import functions, ops
from graphopt.ir import ir
from graphopt.library import attention as canonical
from graphopt.passes._weights import add_initializer
from graphopt.passes.precision.ranges import ActRange, SymmetricRange
from graphopt.rewrite import RULE_TAG

RULE = "QuantizeAttentionProducts"
LAYOUT_OPS = frozenset(ops.OpId(ops.ONNX_DOMAIN, n) for n in ("Reshape", "Transpose", "Squeeze", "Unsqueeze"))
PERCENTILES = (100.0, 99.999, 99.99, 99.9)
MAX_SEQUENCES = 4  # calibration sequences (of the first fit batch) the ranges and errors are measured on


@dataclasses.dataclass
class AttentionSite:
    """One canonical attention call; `roots` are where Q, K^T and V get their quantizers."""

    index: int
    node: ir.Node
    roots: tuple[ir.Value, ir.Value, ir.Value]

    @property
    def name(self) -> str:
        return self.node.name or f"{self.node.op_type}_{self.index}"


def _root(value: ir.Value) -> ir.Value:
    """The first value of the layout chain that alone leads to `value` (precondition 2)."""
    while True:
        node = value.producer()
        if node is None or (node.domain, node.op_type) not in LAYOUT_OPS or node.inputs[0] is None:
            return value
        source = node.inputs[0]
        if source.is_graph_output() or source.const_value is not None \
                or len(list(source.uses())) != 1:
            return value
        value = source


def find_attention_sites(graph: ir.Graph) -> list[AttentionSite]:
    """Every float32 canonical attention call in graph order (precondition 1)."""
    sites = []
    for node in graph:
        if not canonical.is_canonical(node) or any(v is None for v in node.inputs[:3]):
            continue
        if node.inputs[0].dtype != ir.DataType.FLOAT:
            continue
        roots = tuple(_root(v) for v in node.inputs[:3])
        if len({id(r) for r in roots}) == 3:  # one value read as two of Q, K, V: left float
            sites.append(AttentionSite(len(sites), node, roots))
    return sites


def capture_names(site: AttentionSite) -> list[str]:
    return [v.name for v in site.node.inputs if v is not None]


def reference(q, kt, v, bias, scale: float, p_range: ActRange | None = None):
    """(Y, P) of the canonical op in numpy; `p_range` rounds P first."""
    s = np.matmul(q, kt) * np.float32(scale)
    if bias is not None:
        s = s + bias
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.matmul(p if p_range is None else p_range.fake(p), v), p


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def choose(site: AttentionSite, captured: dict[str, np.ndarray]) -> tuple[list[SymmetricRange], ActRange, float]:
    """Ranges for Q, K^T, V (each by the call's output error with it alone rounded), P's range,
    and the call's output error with all four rounded."""
    inputs = [np.asarray(captured[v.name][:MAX_SEQUENCES], np.float32) for v in site.node.inputs[:3]]
    bias = site.node.inputs[3] if len(site.node.inputs) > 3 else None
    b = None if bias is None else np.asarray(captured[bias.name][:MAX_SEQUENCES], np.float32)
    scale = site.node.attributes.get_float("scale", 1.0)
    exact, p = reference(*inputs, b, scale)
    chosen = []
    for i, x in enumerate(inputs):
        mags = np.abs(x).ravel()
        best = None
        for pct in PERCENTILES:
            r = SymmetricRange(float(mags.max() if pct == 100 else np.percentile(mags, pct)),
                         "max" if pct == 100 else f"percentile {pct}")
            trial = [r.fake(y) if j == i else y for j, y in enumerate(inputs)]
            err = _rel(reference(*trial, b, scale)[0], exact)
            if best is None or err < best[0]:
                best = (err, r)
        chosen.append(best[1])
    p_range = ActRange(0.0, min(float(p.max()), 1.0), "max")  # uint8 from 0: zero point 0
    rounded = [r.fake(y) for r, y in zip(chosen, inputs)]
    return chosen, p_range, _rel(reference(*rounded, b, scale, p_range)[0], exact)


def quantize(graph: ir.Graph, site: AttentionSite, qkv: list[SymmetricRange], p_range: ActRange) -> None:
    """Quantizers on the three roots, and the call replaced by its quantized variant."""
    for root, r in zip(site.roots, qkv):
        readers = list(root.uses())  # before the quantizer reads it too
        scale = add_initializer(graph, root, np.array(r.scale, np.float32), "scale")
        zero = add_initializer(graph, root, np.array(0, np.int8), "zero_point")
        q = ir.node("QuantizeLinear", [root, scale, zero], name=f"{site.name}_{root.name}_quantize")
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=f"{site.name}_{root.name}_dequantize")
        dq.outputs[0].type, dq.outputs[0].shape = root.type, root.shape
        for n in (q, dq):
            n.metadata_props[RULE_TAG] = RULE
        anchor = root.producer()
        if anchor is not None:
            graph.insert_after(anchor, [q, dq])
        else:
            graph.insert_before(readers[0][0], [q, dq])
        for reader, at in readers:
            reader.replace_input_with(at, dq.outputs[0])
    node = site.node
    p_scale = add_initializer(graph, None, np.array(p_range.scale, np.float32), f"{site.name}_p_scale")
    p_zero = add_initializer(graph, None, np.array(p_range.zero_point, np.uint8), f"{site.name}_p_zero_point")
    call = ir.Node(functions.DOMAIN, canonical.QUANTIZED[node.op_type], [*node.inputs, p_scale, p_zero],
                   attributes=[ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()], name=node.name)
    call.metadata_props[RULE_TAG] = RULE
    out = node.outputs[0]
    y = call.outputs[0]
    y.name, y.type, y.shape = out.name, out.type, out.shape
    out.name = None
    graph.insert_before(node, call)
    out.replace_all_uses_with(y, replace_graph_outputs=True)
    graph.remove(node, safe=True)
