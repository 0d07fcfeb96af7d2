"""Where int8 goes: linear layers with constant weights (MatMul, Gemm, Conv) and an activation
input. Attention's own products (Q K^T, P V) are products.py's, for OpenVINO only; everything
elementwise stays in float."""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt.ir import ir
from graphopt.passes._weights import const_array


@dataclasses.dataclass
class Site:
    """One quantizable layer: `node` computes x @ W (MatMul, Gemm) or conv(x, W); `axis` is the
    weight's output-channel axis (per-channel scales run along it)."""

    index: int
    node: ir.Node
    x: ir.Value
    weight: ir.Value
    axis: int

    @property
    def name(self) -> str:
        return self.node.name or f"{self.node.op_type}_{self.index}"

    @property
    def w(self) -> np.ndarray:
        return const_array(self.weight)


def find_sites(graph: ir.Graph) -> list[Site]:
    """Every quantizable layer in graph order."""
    sites = []
    for node in graph:
        if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x is None or w is None or const_array(x) is not None:
            continue
        array = const_array(w)
        if array is None or array.dtype != np.float32:
            continue
        if node.op_type == "MatMul" and array.ndim == 2:
            axis = 1
        elif node.op_type == "Gemm" and array.ndim == 2 and not node.attributes.get_int("transA", 0):
            axis = 0 if node.attributes.get_int("transB", 0) else 1
        elif node.op_type == "Conv" and array.ndim >= 3:
            axis = 0
        else:
            continue
        sites.append(Site(len(sites), node, x, w, axis))
    return sites
