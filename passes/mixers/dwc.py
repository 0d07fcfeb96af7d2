"""SLAB's depthwise-conv branch (linear:relu+dwc): Y = LinearAttentionRelu(..) + TokenConv(V), a
per-head, per-channel convolution over the value tokens (kernel CONV_KERNEL; causal layers see
only earlier tokens), fitted on calibration data from a zero kernel. Its ONNX body, torch
reference, fit and graph edit."""

from __future__ import annotations

import numpy as np

from graphopt.functions import define
from graphopt.ir import ir
from graphopt.passes.mixers import spec as specs, transfer

CONV_KERNEL = 5  # tokens i-2..i+2 (causal: i-4..i)


def conv_name(causal: bool) -> str:
    return "CausalTokenConv" if causal else "TokenConv"


def _body(causal: bool):
    before, after = (CONV_KERNEL - 1, 0) if causal else (CONV_KERNEL // 2, CONV_KERNEL // 2)

    def body(op, c, q, v, keymask, w):
        """Y_i = sum_j W[h, j, c] * V_{i + j - a} (a = K // 2, causal: a = K - 1), padded keys
        zeroed, zero padding at the ends; the last S rows (the queries). W [H, K, Dv]."""
        axis2 = c.i64([2])
        padded = op.Pad(op.Mul(v, keymask), c.i64([0, 0, before, 0, 0, 0, after, 0]))
        t_len, s_len = op.Shape(v, start=-2, end=-1), op.Shape(q, start=-2, end=-1)
        terms = []
        for j in range(CONV_KERNEL):
            start = c.i64([j])
            tap = op.Slice(padded, start, op.Add(t_len, start), axis2)
            terms.append(op.Mul(tap, op.Unsqueeze(op.Gather(w, c.i64(j), axis=1), c.i64([0, 2]))))
        return op.Slice(op.Sum(*terms), op.Sub(t_len, s_len), c.i64([np.iinfo(np.int64).max]), axis2)

    return body


for _causal in (False, True):
    define(conv_name(_causal), ("Q", "V", "keymask", "W"))(_body(_causal))


def token_conv(q, v, keymask, w, causal: bool = False):
    """The torch reference: w [H, K, Dv]."""
    import torch

    k, t = w.shape[1], v.shape[-2]
    before, after = (k - 1, 0) if causal else (k // 2, k // 2)
    padded = torch.nn.functional.pad(v * keymask, (0, 0, before, after))
    out = sum(padded[:, :, j:j + t] * w[None, :, j, None, :] for j in range(k))
    return out[:, :, t - q.shape[-2]:]


def initial_conv(node: ir.Node) -> np.ndarray:
    """The depthwise kernel [H, K, Dv], zeros: before fitting, the branch adds nothing."""
    heads, size = specs.heads_and_size(node, "the dwc branch")
    return np.zeros((heads, CONV_KERNEL, size), np.float32)


def fit_token_conv(base, cap, node, w0: np.ndarray, steps: int, seed: int) -> np.ndarray:
    """The kernel minimizing the error of `base(q, kt, v, keymask)` (the linear attention, whose
    feature map has no parameters: fixed) + conv against the captured softmax output."""
    import torch

    w = torch.nn.Parameter(torch.as_tensor(w0).clone())
    causal = specs.is_causal(node)
    data = []
    with torch.no_grad():
        for q, kt, v, b, y in transfer.batches(cap):
            base_out = base(q, kt, v, transfer.keymask(b))
            data.append((q, v, transfer.keymask(b), y - base_out, transfer.query_mask(b, kt.shape[-1], q.shape[-2]),
                         y.pow(2).mean()))

    def loss(batch):
        q, v, km, residual, mask, norm = batch
        return (((token_conv(q, v, km, w, causal) - residual) ** 2) * mask).mean() / (norm + 1e-12)

    transfer.fit([w], loss, data, steps, seed)
    return transfer.array(w)


def add_token_conv(b, linear: ir.Value, keymask: ir.Value, w: np.ndarray, causal: bool) -> tuple[ir.Value, str]:
    """Add(linear attention, TokenConv(V)); returns the sum and the conv's op name."""
    node = b.node
    conv = b.call(conv_name(causal), [node.inputs[0], node.inputs[2], keymask, b.constant(w, f"dwc_{node.name}")],
                  suffix="dwc")
    return b.add("Add", [linear, conv], name=f"{node.name}_linear_dwc"), conv_name(causal)
