"""Nothing invalid leaves (issue 27, item 1): rewrites respect values that cross subgraph
boundaries (If branches, Loop and Scan bodies reading outer values), and a step whose output
does not load is rolled back even when no numbers can be compared."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import graphopt
from graphopt import plan as plan_mod, registry, verify
from graphopt.ir import ir
from graphopt.rewrite import Pass, PassKind
from graphopt.steps import ExactStep

F, B, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL, onnx.TensorProto.INT64
pytestmark = pytest.mark.filterwarnings("ignore")


def _vi(name, shape=(2, 3), dtype=F):
    return oh.make_tensor_value_info(name, dtype, list(shape))


def _model(nodes, inputs, outputs) -> onnx.ModelProto:
    model = oh.make_model(oh.make_graph(nodes, "g", inputs, outputs), opset_imports=[oh.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def if_model() -> onnx.ModelProto:
    """The then branch returns an outer value through an Identity (Silero VAD's form); the else
    branch recomputes an outer Add (a CSE candidate across the boundary) and a Cast to the same type."""
    then_g = oh.make_graph([oh.make_node("Identity", ["h"], ["t_out"])], "then", [], [_vi("t_out")])
    else_g = oh.make_graph([oh.make_node("Add", ["h", "y"], ["e_sum"]), oh.make_node("Cast", ["e_sum"], ["e_out"], to=F)],
                           "else", [], [_vi("e_out")])
    return _model([oh.make_node("Relu", ["x"], ["h"]), oh.make_node("Add", ["h", "y"], ["s"]),
                   oh.make_node("If", ["c"], ["r"], then_branch=then_g, else_branch=else_g),
                   oh.make_node("Mul", ["r", "s"], ["z"])],
                  [_vi("x"), _vi("y"), _vi("c", (), B)], [_vi("z")])


def loop_model() -> onnx.ModelProto:
    """A Loop body that returns an outer value as its scan output through an Identity."""
    body = oh.make_graph(
        [oh.make_node("Identity", ["cond_in"], ["cond_out"]), oh.make_node("Add", ["v_in", "h"], ["v_out"]),
         oh.make_node("Identity", ["h"], ["scan_out"])],
        "body", [_vi("i", (), I64), _vi("cond_in", (), B), _vi("v_in")], [_vi("cond_out", (), B), _vi("v_out"), _vi("scan_out")])
    return _model([oh.make_node("Relu", ["x"], ["h"]), oh.make_node("Loop", ["n", "", "x"], ["v", "scans"], body=body)],
                  [_vi("x"), _vi("n", (), I64)], [_vi("v"), _vi("scans", (3, 2, 3))])


def scan_model() -> onnx.ModelProto:
    """A Scan body that returns an outer value through an Identity next to its real work."""
    body = oh.make_graph(
        [oh.make_node("Add", ["acc_in", "row"], ["acc_out"]), oh.make_node("Identity", ["h"], ["seen"])],
        "body", [_vi("acc_in", (3,)), _vi("row", (3,))], [_vi("acc_out", (3,)), _vi("seen")])
    return _model([oh.make_node("Relu", ["x"], ["h"]),
                   oh.make_node("Scan", ["acc0", "x"], ["acc", "seens"], body=body, num_scan_inputs=1)],
                  [_vi("x"), _vi("acc0", (3,))], [_vi("acc", (3,)), _vi("seens", (2, 2, 3))])


def _feeds(model: graphopt.Model, **fixed) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.inputs:
        shape = [d if isinstance(d, int) else 1 for d in value.shape]
        feeds[value.name] = fixed[value.name] if value.name in fixed else rng.standard_normal(shape).astype(np.float32)
    return feeds


CASES = {
    "if": (if_model, [{"c": np.array(True)}, {"c": np.array(False)}]),
    "loop": (loop_model, [{"n": np.array(3, np.int64)}]),
    "scan": (scan_model, [{}]),
}


@pytest.mark.parametrize("name", CASES)
def test_identity_returning_an_outer_value_from_a_subgraph_stays(name):
    make, _ = CASES[name]
    model = graphopt.load(make())
    counts = registry.get("eliminate-identity")(model.ir)
    # Only the if model's Cast (inside the else branch, on a value of its own) is removable.
    assert counts == {"RemoveIdentity": 0, "RemoveSameTypeCast": int(name == "if"), "RemoveIdentityTranspose": 0, "RemoveUnitFactor": 0}
    assert verify.load_problem(model) is None


def test_the_identity_rule_says_why_it_stays():
    model = graphopt.load(if_model())
    lines = registry.get("eliminate-identity").near_misses(model.ir)
    assert any("'t_out' is a subgraph output and 'h' comes from an enclosing graph" in line for line in lines), lines


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("pass_name", ["fold-constants", "cse", "eliminate-dead-code"])
def test_cleanup_passes_keep_subgraphs_loadable(name, pass_name):
    make, _ = CASES[name]
    model = graphopt.load(make())
    registry.get(pass_name)(model.ir)
    assert verify.load_problem(model) is None


@pytest.mark.parametrize("name", CASES)
def test_exact_preset_on_control_flow_is_checked_on_every_branch_given(name):
    make, fixed_sets = CASES[name]
    source = graphopt.load(make())
    for fixed in fixed_sets:  # one run per branch the user drives
        feeds = _feeds(source, **fixed)
        result = graphopt.optimize(source, preset="exact", inputs=feeds)
        assert result.passed and result.report.validation is not None
        assert verify.load_problem(result.model) is None
        got, want = verify.run(result.model, feeds), verify.run(source, feeds)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)


class _BreakSubgraphOutput(Pass):
    """A deliberately wrong pass: the If's then branch returns the outer value directly."""

    name = "break-subgraph-output"
    kind = PassKind.EXACT

    def run(self, model: ir.Model) -> dict[str, int]:
        node = next(n for n in model.graph if n.op_type == "If")
        branch = node.attributes["then_branch"].value
        identity = next(iter(branch))
        outer = identity.inputs[0]
        branch.outputs[0] = outer
        branch.remove(identity, safe=False)
        return {"Break": 1}


@pytest.mark.parametrize("feeds", [None, "given"])
def test_a_step_whose_output_does_not_load_is_rolled_back(feeds):
    """With numbers compared or not: onnx.checker (or the onnxruntime load) refuses the step."""
    model = graphopt.load(if_model())
    given = _feeds(model, c=np.array(True)) if feeds else None
    result = plan_mod.Plan([ExactStep(_BreakSubgraphOutput())]).run(model, feeds=given)
    record = result.records[0]
    assert record.status == "rolled-back" and "does not load" in record.note, record.note
    assert verify.load_problem(result.model) is None
