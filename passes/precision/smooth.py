"""SmoothQuant, as an exact re-parameterization before rounding: linear layers that read one
activation x hand part of each channel's range to their weights.

Math (channel j of x, W the readers' weights [K, N], s_j > 0):
    (x / s) (diag(s) W) = x W
The function is unchanged (validated equal before any rounding), while x / s has a flatter range
per channel and a per-tensor activation scale fits it. s_j = max|x_j|^alpha / max|W_j|^(1 - alpha),
alpha chosen per activation on the calibration data (the readers' int8 error; alpha 0 = none).
Where x / s goes:
    - x is a LayerNormalization's (or RMSNormalization's) output that only these layers read
      (Pre-LN / Pre-RMSNorm): into the norm's affine, gamma / s (and beta / s; no new op);
    - otherwise (Post-LN, whose norm output is also the residual; a GELU's output): an explicit
      Mul(x, 1 / s) on the branch to these layers (elementwise: 1 / N of the matmul's work).
Preconditions:
    1. Every reader of x in the group is a MatMul / Gemm site reading it as its activation input.
    2. Folding into a norm: constant scale (and bias), and no other reader of its output (through
       a Reshape that keeps the channel axis last, as legacy exports flatten before Gemm).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt import ops
from graphopt.ir import ir
from graphopt.passes._weights import add_initializer, const_array
from graphopt.passes.precision import ranges
from graphopt.passes.precision.sites import Site

ALPHAS = (0.0, 0.25, 0.5, 0.75)  # 0: no migration
AFFINE = {"LayerNormalization": (1, 2), "RMSNormalization": (1,)}  # the inputs that scale the norm's output


@dataclasses.dataclass
class Group:
    """Sites reading one activation `x`."""

    x: ir.Value
    readers: list[Site]

    @property
    def norm(self) -> ir.Node | None:
        """The norm (LayerNormalization or RMSNormalization) that can absorb 1/s (precondition 2), or None."""
        readers = {id(r.node) for r in self.readers}
        if self.x.is_graph_output() or any(id(n) not in readers for n, _ in self.x.uses()):
            return None
        node = self.x.producer()
        while node is not None and node.op_type in ("Reshape", "Flatten") and _keeps_channels(node):
            node = node.inputs[0].producer()  # a flatten that keeps the channel axis last (legacy Gemm exports)
        if node is None or node.op_type not in AFFINE or node.domain not in ("", "ai.onnx", "graphopt"):
            return None
        affine = [node.inputs[i] for i in AFFINE[node.op_type] if len(node.inputs) > i and node.inputs[i] is not None]
        if any(const_array(v) is None for v in affine):
            return None
        return node


def _keeps_channels(node: ir.Node) -> bool:
    """A Reshape/Flatten whose input only it reads (Shape nodes aside: they see no values) and
    whose last axis is its input's."""
    x, y = node.inputs[0], node.outputs[0]
    if x is None or x.is_graph_output() or x.shape is None or y.shape is None:
        return False
    if any(r is not node and ops.OpId(ops.normalize_domain(r.domain), r.op_type) not in ops.SHAPE_ONLY_READERS
           for r, _ in x.uses()):
        return False
    return isinstance(x.shape[-1], int) and x.shape[-1] == y.shape[-1]


def groups(sites: list[Site]) -> list[Group]:
    """MatMul / Gemm sites grouped by the activation they read (Conv is not smoothed)."""
    by_x: dict[int, Group] = {}
    for site in sites:
        if site.node.op_type in ("MatMul", "Gemm"):
            by_x.setdefault(id(site.x), Group(site.x, [])).readers.append(site)
    return list(by_x.values())


def _transposed(site: Site) -> bool:
    return site.node.op_type == "Gemm" and bool(site.node.attributes.get_int("transB", 0))


def dense(site: Site, s: np.ndarray | None = None) -> np.ndarray:
    """The site's weight as [K, N] (x @ W form), rows scaled by `s`."""
    w = site.w.T if _transposed(site) else site.w
    return w if s is None else w * s[:, None]


def factors(rows: np.ndarray, group: Group, alpha: float) -> np.ndarray:
    act = np.abs(rows).max(0)
    wmax = np.max([np.abs(dense(r)).max(1) for r in group.readers], axis=0)
    s = np.power(np.maximum(act, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
    return np.clip(np.where(act > 0, s, 1.0), 1e-4, 1e4).astype(np.float32)


def choose(rows: np.ndarray, group: Group) -> tuple[float, np.ndarray, float]:
    """(alpha, s, the readers' summed local int8 error) with the lowest error on `rows` (fit data)."""
    best = None
    for alpha in ALPHAS:
        s = factors(rows, group, alpha) if alpha else np.ones(rows.shape[-1], np.float32)
        err = sum(ranges.best_range(rows / s, dense(r, s))[1] for r in group.readers)
        if best is None or err < best[2] - 1e-9:
            best = (alpha, s, err)
    return best


def apply(graph: ir.Graph, group: Group, s: np.ndarray) -> str:
    """Migrate: weights scaled by s, x divided by s (in the norm's affine, or by a Mul); returns how."""
    norm = group.norm
    if norm is not None:
        for index in AFFINE[norm.op_type]:
            if len(norm.inputs) > index and norm.inputs[index] is not None:
                value = norm.inputs[index]
                norm.replace_input_with(index, add_initializer(graph, value, (const_array(value) / s).astype(np.float32),
                                                               "smoothed"))
        how = f"into {norm.name}'s affine"
        x = group.x
    else:
        inverse = add_initializer(graph, group.x, (1.0 / s).astype(np.float32), "smooth_inverse")
        mul = ir.node("Mul", [group.x, inverse], name=f"{group.x.name}_smoothed")
        mul.outputs[0].dtype, mul.outputs[0].shape = group.x.dtype, group.x.shape
        graph.insert_before(group.readers[0].node, [mul])
        x = mul.outputs[0]
        how = "by a Mul on the branch to the readers"
    for site in group.readers:
        w = site.w * (s[None, :] if _transposed(site) else s[:, None])
        new = add_initializer(graph, site.weight, w.astype(np.float32), "smoothed")
        site.node.replace_input_with(1, new)
        site.weight = new
        if x is not group.x:
            site.node.replace_input_with(0, x)
            site.x = x
    return how

