"""OpenVINO's lowering passes (passes/openvino_lowering.py): exact counts, equivalence in
onnxruntime and OpenVINO, a negative per precondition, and the whole lowering on a real BERT
export (exact and int8)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphopt
import models
from graphopt.backends import openvino
from graphopt.passes.precision import qdq
from graphopt.passes.precision.ranges import ActRange
from graphopt.passes.precision.sites import find_sites
from openvino_check import assert_matches_in_openvino
from rule_testing import apply, assert_equivalent, assert_explained, build, header, ops_of
from test_linear_merges import QKV, QKV_SHAPES

pytestmark = pytest.mark.filterwarnings("ignore")


def merged():
    original = build(QKV, **QKV_SHAPES)
    return original, apply("merge-parallel-linears", original)[0]


def test_split_parallel_linears_undoes_the_merge():
    original, model = merged()
    split, counts = apply("split-parallel-linears", model)
    assert counts == {"SplitParallelLinears": 1}
    assert ops_of(split) == {"MatMul": 3, "Add": 3, "Relu": 3}  # K's merged bias part was zeros: it stays an Add
    assert_equivalent(original, split)
    assert_equivalent(model, split)
    assert_matches_in_openvino(split, graphopt.feeds.make_inputs(split))
    assert apply("split-parallel-linears", split)[1] == {"SplitParallelLinears": 0}


def test_split_parallel_linears_on_a_per_channel_int8_weight():
    _, model = merged()
    quantized = model.clone()
    site = find_sites(quantized.ir.graph)[0]
    qdq.quantize(quantized.ir.graph, site, ActRange(-4.0, 4.0, "minmax"))  # the int8 step's emission
    assert ops_of(quantized)["DequantizeLinear"] == 2  # x and the merged weight
    split, counts = apply("split-parallel-linears", quantized)
    assert counts == {"SplitParallelLinears": 1}
    assert ops_of(split)["DequantizeLinear"] == 4 and ops_of(split)["MatMul"] == 3
    assert_equivalent(quantized, split)


def test_split_parallel_linears_negatives():
    _, model = merged()
    # 1. The MatMul has another reader.
    proto = graphopt.exporters.to_proto(model)
    matmul = next(n for n in proto.graph.node if n.op_type == "MatMul")
    proto.graph.node.append(onnx.helper.make_node("Relu", [matmul.output[0]], ["extra"]))
    proto.graph.output.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [2, 6, 16]))
    other = graphopt.load(proto)
    assert apply("split-parallel-linears", other)[1] == {"SplitParallelLinears": 0}
    assert_explained("split-parallel-linears", other, "SplitParallelLinears", "has other readers")
    # 1. A split that is not along the last axis.
    text = header(21) + """
g (float[2, 6, 8] x) => (float[1, 6, 8] a, float[1, 6, 8] b) <float[8, 8] w, int64[2] sizes = {1, 1}> {
    y = MatMul(x, w)
    a, b = Split<axis = 0>(y, sizes)
}"""
    first = build(text, w=[8, 8])
    assert apply("split-parallel-linears", first)[1] == {"SplitParallelLinears": 0}
    assert_explained("split-parallel-linears", first, "SplitParallelLinears", "not a split of the last axis")
    # 2. A weight that is not constant.
    text = header(21) + """
g (float[2, 6, 8] x, float[8, 8] w) => (float[2, 6, 4] a, float[2, 6, 4] b) <int64[2] sizes = {4, 4}> {
    y = MatMul(x, w)
    a, b = Split<axis = -1>(y, sizes)
}"""
    graph_weight = build(text)
    assert apply("split-parallel-linears", graph_weight)[1] == {"SplitParallelLinears": 0}
    assert_explained("split-parallel-linears", graph_weight, "SplitParallelLinears", "neither constant nor dequantized")


KEYS = header(21) + """
g (float[2, 6, 16] q, float[2, 6, 16] k) => (float[2, 4, 6, 6] s) <int64[4] heads = {2, 6, 4, 4}> {
    q4 = Reshape(q, heads)
    qt = Transpose<perm = [0, 2, 1, 3]>(q4)
    k4 = Reshape(k, heads)
    kt = Transpose<perm = [0, 2, 3, 1]>(k4)
    s = MatMul(qt, kt)
}"""


def test_heads_first_keys():
    original = build(KEYS)
    model, counts = apply("heads-first-keys", original)
    assert counts == {"HeadsFirstKeys": 1}
    perms = sorted(tuple(n.attributes.get_ints("perm")) for n in model.graph if n.op_type == "Transpose")
    assert perms == [(0, 1, 3, 2), (0, 2, 1, 3), (0, 2, 1, 3)]
    assert_equivalent(original, model)
    assert_matches_in_openvino(model, graphopt.feeds.make_inputs(model))
    assert apply("heads-first-keys", model)[1] == {"HeadsFirstKeys": 0}


def test_heads_first_keys_negatives():
    # 1. Another permutation.
    other = build(KEYS.replace("perm = [0, 2, 3, 1]", "perm = [0, 2, 1, 3]").replace("s = MatMul(qt, kt)",
                  "kk = Transpose<perm = [0, 1, 3, 2]>(kt)\n    s = MatMul(qt, kk)"))
    assert apply("heads-first-keys", other)[1] == {"HeadsFirstKeys": 0}
    # 2. A reader that is not a MatMul's second input.
    text = KEYS.replace("=> (float[2, 4, 6, 6] s)", "=> (float[2, 4, 6, 6] s, float[2, 4, 4, 6] r)").replace(
        "s = MatMul(qt, kt)", "s = MatMul(qt, kt)\n    r = Relu(kt)")
    read_twice = build(text)
    assert apply("heads-first-keys", read_twice)[1] == {"HeadsFirstKeys": 0}
    assert_explained("heads-first-keys", read_twice, "HeadsFirstKeys", "not a MatMul's second input")


BERT_DIMS = {"batch": 2, "seq": 16}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return models.exact_bert(tmp_path_factory.mktemp("ov-lowering"), BERT_DIMS)[1]


@pytest.mark.parametrize("precision", [None, "int8"])
def test_openvino_lowering_on_bert(precision, bert):
    """On a legacy BERT export the merged Q/K/V is split again and every key transpose rewritten,
    and the lowered model matches onnxruntime, in OpenVINO too."""
    dims = BERT_DIMS
    model = bert.clone()
    layers = sum(1 for n in model.ir.graph if n.op_type == "Split")
    assert layers == 2
    if precision:  # every linear layer in int8, as the int8 step emits it (its choice depends on timing)
        shared: dict = {}
        sites = find_sites(model.ir.graph)
        for site in sites:
            qdq.quantize(model.ir.graph, site, ActRange(-4.0, 4.0, "minmax"), shared)
        assert len(sites) == 8 and ops_of(model)["DequantizeLinear"] == 2 * len(sites)
    lowered = openvino.portable(model)
    assert not [n for n in lowered.ir.graph if n.op_type == "Split"]
    perms = [tuple(n.attributes.get_ints("perm")) for n in lowered.ir.graph if n.op_type == "Transpose"]
    assert (0, 2, 3, 1) not in perms and perms.count((0, 1, 3, 2)) == layers
    feeds = graphopt.feeds.make_inputs(model, dims=dims)
    if precision is None:
        assert_equivalent(model, lowered, dims=dims)
    else:  # int8: the same integers, so equal to float tolerance in onnxruntime
        ref, got = graphopt.verify.run(model, feeds), graphopt.verify.run(lowered, feeds)
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-5)
    assert_matches_in_openvino(lowered, feeds)
