"""Rules are tried only where they can match (issue 27, item 5): exact-preset time follows the
graph, not rules x nodes. Anchored matching finds exactly what onnxscript's unanchored matching
finds, and tries nothing where a pattern's rarest op is absent."""

from __future__ import annotations

import onnx.parser
import pytest

import graphopt
from graphopt.ir import RewriteRuleSet, common_passes
from graphopt.passes.activations import FuseActivations, FuseGelu, FuseGeluTanh, FuseSiLU
from test_activations import gelu_erf, gelu_tanh


def _with_noise(text: str, muls: int) -> graphopt.Model:
    """`text`'s model with a chain of `muls` Mul/Add nodes (the roots every GELU copy would try)
    feeding nothing but a second output."""
    proto = onnx.parser.parse_model(text)
    graph = proto.graph
    source = graph.input[0].name
    previous = source
    for i in range(muls):
        graph.node.append(onnx.helper.make_node("Mul" if i % 2 else "Add", [previous, previous], [f"noise{i}"]))
        previous = f"noise{i}"
    graph.output.append(onnx.helper.make_tensor_value_info(previous, graph.input[0].type.tensor_type.elem_type, None))
    graph.output[-1].type.CopyFrom(graph.input[0].type)
    return graphopt.load(proto)


def _unanchored(rule_cls) -> RewriteRuleSet:
    return RewriteRuleSet([rule_cls.rule(**v) for v in rule_cls.variants], commute=rule_cls.commute)


@pytest.mark.parametrize("association", ["x-first", "half-first", "cdf-half"])
def test_anchored_matching_finds_what_unanchored_matching_finds(association):
    model = _with_noise(gelu_tanh(association, "pow"), 200)
    anchored, plain = model.clone(), model.clone()
    assert FuseActivations()(anchored.ir) == {"FuseGelu": 0, "FuseGeluTanh": 1, "FuseSiLU": 0, "FuseSoftmax": 0}
    assert _unanchored(FuseGeluTanh).apply_to_model(plain.ir) == 1
    common_passes.RemoveUnusedNodesPass()(plain.ir)  # as the RulePass does after its rounds
    assert sorted(n.op_type for n in anchored.graph) == sorted(n.op_type for n in plain.graph)


def test_roots_are_only_nodes_near_the_rarest_op():
    model = _with_noise(gelu_tanh("half-first", "pow"), 200)
    rule_set = FuseActivations._rule_set(FuseGeluTanh)
    with rule_set.anchors.on(model.ir) as anywhere:
        roots = [r for r in rule_set.anchors.roots.values()]
        assert anywhere
        assert all(r is not None for r in roots), "every commuted copy has a constant root op"
        # the one Tanh has a handful of Mul nodes below it; none of the 200 noise nodes is a root
        assert max(len(r) for r in roots) <= 4
        assert not any(n.outputs[0].name.startswith("noise") for r in roots for n in r)
    assert rule_set.anchors.roots == {}  # cleared after use: nothing of one model leaks to the next


@pytest.mark.parametrize("rule_cls", [FuseGelu, FuseGeluTanh, FuseSiLU])
def test_a_pattern_whose_anchor_op_is_absent_is_not_tried(rule_cls):
    model = _with_noise("<ir_version: 10, opset_import: [\"\" : 21]>\nagraph (float[2, 8] x) => (float[2, 8] y) "
                        "{ y = Relu(x) }", 300)
    rule_set = FuseActivations._rule_set(rule_cls)
    with rule_set.anchors.on(model.ir) as anywhere:
        assert not anywhere


@pytest.mark.parametrize("scale", ["div", "mul"])
def test_alternatives_are_not_anchors(scale):
    """An op under an OrValue (FuseGelu's Div or Mul by sqrt 2) is optional: a graph holding
    only the other alternative is still tried, and fused."""
    model = _with_noise(gelu_erf("x-first", scale), 50)
    assert FuseActivations()(model.ir) == {"FuseGelu": 1, "FuseGeluTanh": 0, "FuseSiLU": 0, "FuseSoftmax": 0}
    assert not any(n.op_type == "Erf" for n in model.graph)
