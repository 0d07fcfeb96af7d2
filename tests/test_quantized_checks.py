"""The equality check of a quantized model (steps.check_equal): a float-exact rewrite ahead of a
QuantizeLinear can flip roundings, so there equal means a min cosine >= 1 - 1e-5; a float
model keeps the tight tolerance, and a real change still rolls back."""

from __future__ import annotations

import numpy as np

import graphopt
from graphopt import verify
from graphopt.steps import QUANTIZED_EQUAL_COSINE, Stage, StepRecord, check_equal
from rule_testing import build, header

QUANTIZED = header(21) + """
g (float[256, 64] x) => (float[256, 32] y) <float[64, 32] w, float s = {0.02}, uint8 z = {128}> {
    h = MatMul(x, w)
    q = QuantizeLinear(h, s, z)
    y = DequantizeLinear(q, s, z)
}"""
FLOAT = header(21) + """
g (float[256, 64] x) => (float[256, 32] y) <float[64, 32] w> {
    y = MatMul(x, w)
}"""


def _checked(text: str, relative: float):
    """check_equal after the weight moved by `relative` (a stand-in for a GEMM summed in another order)."""
    model = build(text, w=[64, 32])
    feeds = graphopt.feeds.make_inputs(model, seed=1)
    stage = Stage(model, feeds, verify.run(model, feeds))
    snapshot = model.ir.clone()
    w = model.ir.graph.initializers["w"]
    array = w.const_value.numpy()
    w.const_value = graphopt.ir.ir.tensor(array * np.float32(1 + relative) + np.float32(relative) * array.std(), name="w")
    record = check_equal(stage, StepRecord("lower-test", "lowering", {"Test": 1}, 0.0, "applied"), snapshot)
    return record, stage, feeds


def test_flipped_roundings_in_a_quantized_model_are_equal():
    record, stage, feeds = _checked(QUANTIZED, 1e-5)
    assert record.check["passed"] and record.status == "applied" and "quantized" in record.check["criterion"]
    assert record.check["max_abs_error"] >= 0.02 * 0.999  # at least one rounding flipped by a whole step
    assert record.check["min_cosine"] >= QUANTIZED_EQUAL_COSINE


def test_a_real_change_in_a_quantized_model_rolls_back():
    record, *_ = _checked(QUANTIZED, 1e-2)
    assert not record.check["passed"] and record.status == "rolled-back"


def test_a_float_model_keeps_the_tight_tolerance():
    record, *_ = _checked(FLOAT, 1e-3)
    assert record.check["min_cosine"] >= QUANTIZED_EQUAL_COSINE  # as close as the quantized case above,
    assert not record.check["passed"] and record.status == "rolled-back"  # but float: not equal
