"""Bias correction after rounding (the empirical form of Nagel et al., "Data-Free Quantization",
2019): the int8 layer's mean output error per channel, measured on the fit data, goes into its bias.

Math (y = x W + b; the int8 layer computes y~ = q(x) q(W) + b; c an output channel):
    d_c = E[y_c - y~_c]   over the fit data
    y~ + d  has zero mean error in every channel (the error's variance is unchanged).
MatMul / Gemm are linear in x, so d = E[x] W - E[q(x)] q(W), from the mean rows alone. Conv is
measured: the layer alone, float and QDQ, in onnxruntime on the captured inputs, averaged over
the batch and spatial axes.
Preconditions:
    1. The layer has a constant bias with one entry per output channel: Gemm's C, Conv's B, or an
       Add of a constant [N] that alone reads a MatMul's output (how exporters write Linear).
    2. For Conv, the captured inputs share one shape (the measurement runs at it).
Whether the corrected model is kept is decided on held-out data by the step (step.py).
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import ir
from graphopt.passes._weights import add_initializer, const_array
from graphopt.passes.precision import ranges
from graphopt.passes.precision.ranges import ActRange
from graphopt.passes.precision.sites import Site


def bias_input(site: Site) -> tuple[ir.Node, int] | None:
    """(node, input index) of the site's per-channel constant bias (precondition 1), or None."""
    node = site.node
    channels = site.w.shape[site.axis]
    if node.op_type in ("Gemm", "Conv"):
        holder, index = node, 2
    else:
        y = node.outputs[0]
        uses = list(y.uses())
        if y.is_graph_output() or len(uses) != 1:
            return None
        holder, at = uses[0]
        if holder.op_type != "Add" or holder.domain not in ("", "ai.onnx"):
            return None
        index = 1 - at
    if len(holder.inputs) <= index or holder.inputs[index] is None:
        return None
    array = const_array(holder.inputs[index])
    if array is None or array.dtype != np.float32 or array.size != channels or array.shape[-1 if node.op_type != "Conv" else 0] != channels:
        return None
    return holder, index


def shift(site: Site, xs: list[np.ndarray], act: ActRange, dense_w: np.ndarray | None) -> np.ndarray | None:
    """d (one float per output channel) from the fit inputs `xs`, or None (a precondition fails)."""
    if bias_input(site) is None:
        return None
    if dense_w is not None:  # MatMul / Gemm: x @ W form [K, N]
        k = dense_w.shape[0]
        total = sum(x.reshape(-1, k).astype(np.float64).sum(0) for x in xs)
        fake_total = sum(act.fake(x.reshape(-1, k)).astype(np.float64).sum(0) for x in xs)
        count = sum(x.size // k for x in xs)
        exact = (total / count) @ dense_w.astype(np.float64)
        approx = (fake_total / count) @ ranges.fake_weight(dense_w, 1).astype(np.float64)
        return (exact - approx).astype(np.float32)
    if len({x.shape for x in xs}) != 1:  # precondition 2
        return None
    from graphopt.sessions import session_for
    from graphopt.passes.precision.gain import layer_model

    runs = [session_for(layer_model(site, xs[0].shape, a), disabled=()) for a in (None, act)]
    diff = sum(np.asarray(runs[0].run({"x": x})["y"], np.float64) - runs[1].run({"x": x})["y"] for x in xs) / len(xs)
    return diff.mean(axis=tuple(i for i in range(diff.ndim) if i != 1)).astype(np.float32)


def correct(graph: ir.Graph, site: Site, d: np.ndarray) -> None:
    """Add d to the site's bias (a new initializer: the old one may be shared)."""
    holder, index = bias_input(site)
    value = holder.inputs[index]
    old = const_array(value)
    holder.replace_input_with(index, add_initializer(graph, value, (old + d.reshape(old.shape)).astype(np.float32),
                                                     "bias_corrected"))
