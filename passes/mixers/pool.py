"""PoolFormer pooling over the value tokens: Y = AvgPool_3(V) - V (causal layers average the
current and two previous tokens only). No parameters. Its ONNX bodies, torch reference and
graph edit."""

from __future__ import annotations

import numpy as np

from graphopt.functions import define
from graphopt.passes.mixers import edit, spec as specs


def pool_name(causal: bool) -> str:
    return "CausalPoolMixer" if causal else "PoolMixer"


def _body(causal: bool):
    pads = [2, 0, 0, 0] if causal else [1, 0, 1, 0]

    def body(op, c, q, v):
        """The last S rows (the queries: with a KV cache, V also holds the past tokens)."""
        pooled = op.AveragePool(v, kernel_shape=[3, 1], pads=pads, strides=[1, 1], count_include_pad=0)
        first = op.Sub(op.Shape(v, start=-2, end=-1), op.Shape(q, start=-2, end=-1))
        return op.Slice(op.Sub(pooled, v), first, c.i64([np.iinfo(np.int64).max]), c.i64([2]))

    return body


for _causal in (False, True):
    define(pool_name(_causal), ("Q", "V"))(_body(_causal))


def pool(v, causal: bool = False, queries: int | None = None):
    """The torch reference; the last `queries` rows (default: all)."""
    import torch

    if causal:  # tokens i-2..i: pad two in front, average what is real
        padded = torch.nn.functional.pad(v, (0, 0, 2, 0))
        ones = torch.nn.functional.pad(torch.ones_like(v[..., :1]), (0, 0, 2, 0))
        total = torch.nn.functional.avg_pool2d(padded, (3, 1), stride=1) * 3
        count = torch.nn.functional.avg_pool2d(ones, (3, 1), stride=1) * 3
        out = total / count - v
    else:
        out = torch.nn.functional.avg_pool2d(v, (3, 1), stride=1, padding=(1, 0), count_include_pad=False) - v
    return out if queries is None else out[..., out.shape[-2] - queries:, :]


class Pool(specs.MixerKind):
    kind = "pool"
    names = ("pool",)

    def output(self, spec, node, q, kt, v, bias, w):
        return pool(v, causal=specs.is_causal(node), queries=q.shape[-2])

    def swap(self, model, node, spec, w, *, quadratic, layer):
        b = edit.Builder(model, node)
        name = pool_name(specs.is_causal(node))
        b.install(b.call(name, [node.inputs[0], node.inputs[2]], suffix="pool"))
        return f"{name} over the value tokens"


specs.register(Pool())
