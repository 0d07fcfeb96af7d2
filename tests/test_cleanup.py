"""Cleanup passes: exact rewrite counts, ORT equivalence, one negative per precondition."""

from __future__ import annotations

import onnx
import onnx.checker
import onnx.parser
import pytest
from hypothesis import given, settings, strategies as st

import graphopt
from graphopt import exporters, registry

HEADER = '<ir_version: 10, opset_import: ["" : 21]>\n'

NOOPS = HEADER + """
g (float[2, 3] x) => (float[3, 2] y) {
    r = Relu(x)
    i = Identity(r)
    c = Cast<to = 1>(i)
    t = Transpose<perm = [0, 1]>(c)
    y = Transpose<perm = [1, 0]>(t)
}
"""


def run_pass(name: str, text: str):
    """Apply one pass to a parsed model; return (original, rewritten, counts)."""
    original = graphopt.load(onnx.parser.parse_model(text))
    model = original.clone()
    counts = registry.get(name)(model.ir)
    return original, model, counts


def assert_equivalent(original, model):
    result = graphopt.validate(original, model)
    assert result.passed, result.to_dict()
    onnx.checker.check_model(exporters.to_proto(model), full_check=True)
    assert [v.name for v in model.graph.inputs] == [v.name for v in original.graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in original.graph.outputs]


def op_types(model):
    return [n.op_type for n in model.graph]


def test_eliminate_identity_positive():
    original, model, counts = run_pass("eliminate-identity", NOOPS)
    assert counts == {"RemoveIdentity": 1, "RemoveSameTypeCast": 1, "RemoveIdentityTranspose": 1, "RemoveUnitFactor": 0}
    assert op_types(model) == ["Relu", "Transpose"]
    assert_equivalent(original, model)
    assert registry.get("eliminate-identity")(model.ir) == dict.fromkeys(counts, 0)  # idempotent


@pytest.mark.parametrize(
    "text, rule, reason",
    [
        # RemoveIdentity 1 / RemoveIdentityTranspose 2: x is a graph input.
        (HEADER + "g (float[2] x) => (float[2] y) { i = Identity(x)\n y = Relu(i) }", "RemoveIdentity", "'x' is a graph input"),
        # RemoveIdentity 1: both values are graph outputs.
        (HEADER + "g (float[2] x) => (float[2] r, float[2] y) { r = Relu(x)\n y = Identity(r) }", "RemoveIdentity", "both graph outputs"),
        # RemoveSameTypeCast 1: the Cast changes the type.
        (HEADER + "g (float[2] x) => (double[2] y) { r = Relu(x)\n y = Cast<to = 11>(r) }", "RemoveSameTypeCast", "Cast makes DOUBLE"),
        # RemoveSameTypeCast 2: x is a graph input.
        (HEADER + "g (float[2] x) => (float[2] y) { c = Cast<to = 1>(x)\n y = Relu(c) }", "RemoveSameTypeCast", "'x' is a graph input"),
        # RemoveIdentityTranspose 1: a real permutation.
        (HEADER + "g (float[2, 3] x) => (float[3, 2] y) { r = Relu(x)\n y = Transpose<perm = [1, 0]>(r) }", "RemoveIdentityTranspose", "not the identity permutation"),
        # RemoveIdentityTranspose 2: x is a graph input.
        (HEADER + "g (float[2, 3] x) => (float[2, 3] y) { t = Transpose<perm = [0, 1]>(x)\n y = Relu(t) }", "RemoveIdentityTranspose", "'x' is a graph input"),
    ],
)
def test_eliminate_identity_negative(text, rule, reason):
    original, model, counts = run_pass("eliminate-identity", text)
    assert sum(counts.values()) == 0
    assert op_types(model) == op_types(original)
    explained = registry.get("eliminate-identity").near_misses(model.ir)
    assert any(line.startswith(rule) and reason in line for line in explained), explained


FOLDABLE = HEADER + """
g (float[3] x) => (float[3] y) <float[3] bias = {1.0, 2.0, 3.0}> {
    two = Constant<value = float[3] {2.0, 2.0, 2.0}>()
    four = Add(two, two)
    b4 = Mul(bias, four)
    y = Add(x, b4)
}
"""


def test_fold_constants_positive():
    original, model, counts = run_pass("fold-constants", FOLDABLE)
    assert counts == {"FoldConstants": 3}  # Constant, Add and Mul become one initializer
    assert op_types(model) == ["Add"]
    assert_equivalent(original, model)


def test_fold_constants_negative_runtime_input():
    # Precondition: all inputs constant. Here every node reads the graph input.
    original, model, counts = run_pass("fold-constants", HEADER + "g (float[3] x) => (float[3] y) { a = Relu(x)\n y = Add(a, x) }")
    assert counts == {"FoldConstants": 0} and op_types(model) == op_types(original)


def test_fold_constants_keeps_random_ops():
    text = HEADER + "g (float[3] x) => (float[3] y) { r = RandomNormal<shape = [3]>()\n y = Add(x, r) }"
    _, model, counts = run_pass("fold-constants", text)
    assert counts == {"FoldConstants": 0} and "RandomNormal" in op_types(model)


def test_cse_positive_and_negative():
    original, model, counts = run_pass("cse", HEADER + "g (float[3] x) => (float[3] y) { a = Relu(x)\n b = Relu(x)\n y = Add(a, b) }")
    assert counts == {"MergeCommonSubexpressions": 1} and op_types(model) == ["Relu", "Add"]
    assert_equivalent(original, model)
    # Different attributes are different computations.
    _, model, counts = run_pass("cse", HEADER + "g (float[3] x) => (float[3] y) { a = LeakyRelu<alpha = 0.1>(x)\n b = LeakyRelu<alpha = 0.2>(x)\n y = Add(a, b) }")
    assert counts == {"MergeCommonSubexpressions": 0}
    # Random ops are never merged.
    _, model, counts = run_pass("cse", HEADER + "g (float[3] x) => (float[3] y) { a = RandomNormal<shape = [3]>()\n b = RandomNormal<shape = [3]>()\n s = Add(a, b)\n y = Add(x, s) }")
    assert counts == {"MergeCommonSubexpressions": 0}


def test_dead_code_positive_and_negative():
    text = HEADER + "g (float[3] x) => (float[3] y) <float[3] unused = {1.0, 1.0, 1.0}> { d = Neg(x)\n e = Exp(d)\n y = Relu(x) }"
    original, model, counts = run_pass("eliminate-dead-code", text)
    assert counts == {"RemoveDeadNodes": 2, "RemoveDeadInitializers": 1, "RemoveDeadFunctions": 0}
    assert_equivalent(original, model)
    _, model, counts = run_pass("eliminate-dead-code", HEADER + "g (float[3] x) => (float[3] y, float[3] z) { y = Relu(x)\n z = Neg(x) }")
    assert sum(counts.values()) == 0  # every node feeds an output


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_exact_preset_property(rows, cols, seed):
    """Random shapes and inputs: the preset stays equivalent, passes the checker,
    keeps the interface, and a second run fires nothing."""
    text = NOOPS.replace("float[2, 3] x", f"float[{rows}, {cols}] x").replace("float[3, 2] y", f"float[{cols}, {rows}] y")
    original = graphopt.load(onnx.parser.parse_model(text))
    result = graphopt.optimize(original, seed=seed)
    assert result.report.validation.passed
    assert_equivalent(original, result.model)
    assert graphopt.optimize(result.model, seed=seed).report.total_rewrites == 0
