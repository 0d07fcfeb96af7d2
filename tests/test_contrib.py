"""onnxruntime contrib ops written as standard ONNX (issue 27, item 4): each converter equal to
onnxruntime's own contrib kernel, a negative per precondition, and `--portable` naming what it
keeps."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest

import graphopt
from graphopt import summary, verify
from graphopt.passes import contrib
from rule_testing import apply

F = onnx.TensorProto.FLOAT
MS = "com.microsoft"
pytestmark = pytest.mark.filterwarnings("ignore")


def _model(node, inputs, outputs, inits=(), opset=20) -> graphopt.Model:
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info(n, F, s) for n, s in inputs],
                          [oh.make_tensor_value_info(n, F, s) for n, s in outputs],
                          initializer=[nh.from_array(a, n) for n, a in inits])
    return graphopt.load(oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset), oh.make_opsetid(MS, 1)]))


rng = np.random.default_rng(0)
W = rng.standard_normal(16).astype(np.float32)
CASES = {
    "FastGelu": lambda: _model(oh.make_node("FastGelu", ["x", "b"], ["y"], domain=MS), [("x", [2, 5, 16])],
                               [("y", [2, 5, 16])], [("b", W)]),
    "FastGelu-no-bias": lambda: _model(oh.make_node("FastGelu", ["x"], ["y"], domain=MS), [("x", [2, 5, 16])],
                                       [("y", [2, 5, 16])]),
    "Gelu": lambda: _model(oh.make_node("Gelu", ["x"], ["y"], domain=MS), [("x", [2, 16])], [("y", [2, 16])]),
    "BiasGelu": lambda: _model(oh.make_node("BiasGelu", ["x", "b"], ["y"], domain=MS), [("x", [2, 16])],
                               [("y", [2, 16])], [("b", W)]),
    "QuickGelu": lambda: _model(oh.make_node("QuickGelu", ["x"], ["y"], domain=MS, alpha=1.5), [("x", [2, 16])],
                                [("y", [2, 16])]),
    "SkipLayerNormalization": lambda: _model(
        oh.make_node("SkipLayerNormalization", ["x", "s", "g", "be", "bi"], ["y", "", "", "sum"], domain=MS, epsilon=1e-5),
        [("x", [2, 3, 16]), ("s", [2, 3, 16])], [("y", [2, 3, 16]), ("sum", [2, 3, 16])],
        [("g", W), ("be", W[::-1].copy()), ("bi", W * 0.5)]),
    "FusedMatMul": lambda: _model(oh.make_node("FusedMatMul", ["a", "b"], ["y"], domain=MS, alpha=0.25, transA=1, transB=1),
                                  [("a", [2, 8, 4]), ("b", [2, 6, 8])], [("y", [2, 4, 6])]),
}


@pytest.mark.parametrize("name", CASES)
def test_contrib_op_written_as_standard_onnx(name):
    original = CASES[name]()
    model, counts = apply("standardize-contrib-ops", original)
    assert counts == {contrib.RULE: 1}
    assert not summary.nonstandard_ops(model.ir), "standard ONNX only"
    feeds = {v.name: rng.standard_normal([d for d in v.shape]).astype(np.float32) for v in original.graph.inputs}
    want, got = verify.run(original, feeds), verify.run(model, feeds)  # the contrib kernel vs the standard form
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_gelu_below_opset_20_stays():
    model, counts = apply("standardize-contrib-ops", _model(oh.make_node("FastGelu", ["x"], ["y"], domain=MS),
                                                           [("x", [2, 16])], [("y", [2, 16])], opset=17))
    assert counts == {contrib.RULE: 0} and summary.nonstandard_ops(model.ir) == {"com.microsoft::FastGelu": 1}


def test_skip_layer_norm_whose_statistics_are_read_stays():
    node = oh.make_node("SkipLayerNormalization", ["x", "s", "g"], ["y", "mean"], domain=MS)
    model, counts = apply("standardize-contrib-ops", _model(node, [("x", [2, 16]), ("s", [2, 16])],
                                                           [("y", [2, 16]), ("mean", [2, 1])], [("g", W)]))
    assert counts == {contrib.RULE: 0}


def test_fused_matmul_with_batch_transposes_stays():
    node = oh.make_node("FusedMatMul", ["a", "b"], ["y"], domain=MS, transBatchA=1)
    model, counts = apply("standardize-contrib-ops", _model(node, [("a", [2, 4, 8]), ("b", [4, 8, 6])], [("y", [4, 2, 6])]))
    assert counts == {contrib.RULE: 0}


def test_portable_output_names_the_contrib_ops_it_keeps():
    node = oh.make_node("FastGelu", ["x"], ["y"], domain=MS)
    source = _model(node, [("x", [2, 16])], [("y", [2, 16])], opset=17)  # no standard Gelu at 17
    result = graphopt.optimize(source, preset="exact", portable=True)
    notes = " ".join(result.report.notes)
    assert "com.microsoft::FastGelu x1" in notes and "onnxruntime only" in notes
    converted = graphopt.optimize(CASES["FastGelu"](), preset="exact", portable=True)
    assert not summary.nonstandard_ops(converted.model.ir) and converted.passed
    assert not any("non-standard" in n for n in converted.report.notes)
