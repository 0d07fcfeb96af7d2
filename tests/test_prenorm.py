"""Pre-LN -> Pre-RMSNorm: proof of the preconditions on the graph, re-centring, equivalence."""

from __future__ import annotations

import pytest

import graphopt
import models
from rule_testing import apply, assert_equivalent, assert_explained, build, header, ops_of

PRE_LN = header(21) + """
g (int64[2, 5] ids) => (float[2, 5, 8] y) <float[16, 8] emb, float[8] g1, float[8] b1, float[8, 8] w1, float[8] c1, float[8] gf, float[8] bf> {
    x0 = Gather(emb, ids)
    n1 = LayerNormalization(x0, g1, b1)
    h = MatMul(n1, w1)
    h2 = Add(h, c1)
    x1 = Add(x0, h2)
    y = LayerNormalization(x1, gf, bf)
}"""
SHAPES = dict(emb=[16, 8], g1=[8], b1=[8], w1=[8, 8], c1=[8], gf=[8], bf=[8])


def test_pre_ln_to_pre_rmsnorm():
    original = build(PRE_LN, **SHAPES)
    model, counts = apply("pre-rmsnorm", original)
    assert counts == {"PreLNToPreRMSNorm": 2}
    assert "LayerNormalization" not in ops_of(model) and ops_of(model)["RMSNormalization"] == 2
    assert_equivalent(original, model)
    assert apply("pre-rmsnorm", model)[1] == {"PreLNToPreRMSNorm": 0}


@pytest.mark.parametrize("text, reason", [
    # 1. No LayerNorm at all.
    (PRE_LN.replace("n1 = LayerNormalization(x0, g1, b1)", "n1 = Relu(x0)").replace("y = LayerNormalization(x1, gf, bf)", "y = Relu(x1)"),
     "no LayerNormalization"),
    # 2. A branch reads the raw stream (a MatMul on x0, not on a LayerNorm of it).
    (PRE_LN.replace("h = MatMul(n1, w1)", "h = MatMul(x0, w1)").replace("    n1 = LayerNormalization(x0, g1, b1)\n", ""),
     "no residual Adds"),
    (PRE_LN.replace("=> (float[2, 5, 8] y)", "=> (float[2, 5, 8] y, float[2, 5, 8] r)").replace("    y = Layer", "    r = Relu(x0)\n    y = Layer"),
     "read by Relu"),
    # 3. A write into the stream that is not linear.
    (PRE_LN.replace("h2 = Add(h, c1)", "h2 = Relu(h)"), "not a linear map"),
    # Post-LN: the stream passes through a LayerNorm after each residual Add.
    (PRE_LN.replace("x1 = Add(x0, h2)", "s1 = Add(x0, h2)\n    x1 = LayerNormalization(s1, g1, b1)"), "Post-LN"),
], ids=["no-layernorm", "raw-stream-matmul", "raw-stream-reader", "nonlinear-writer", "post-ln"])
def test_pre_rmsnorm_negatives(text, reason):
    model = build(text, **SHAPES)
    assert apply("pre-rmsnorm", model)[1] == {"PreLNToPreRMSNorm": 0}
    assert_explained("pre-rmsnorm", model, "PreLNToPreRMSNorm", reason)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_gpt2_becomes_pre_rmsnorm(exporter, tmp):
    """GPT-2 is Pre-LN: all 5 LayerNorms (2 per block + the final one) become RMSNorm;
    LayerNorm parameters and embeddings are non-trivial, so re-centring is really exercised."""
    module, args, names, dynamic = models.gpt2_with_trained_like_norms()
    path = models.export(module, args, names, dynamic, tmp / "gpt2.onnx", exporter)
    result = graphopt.optimize(path, dims={"batch": 2, "seq": 16})
    assert result.report.validation.passed, result.report.validation.to_dict()
    assert result.report.rewrites()["PreLNToPreRMSNorm"] == 5
    assert ops_of(result.model)["RMSNormalization"] == 5 and "LayerNormalization" not in ops_of(result.model)


@pytest.mark.slow
def test_bert_is_refused_as_post_ln(tmp):
    module, args, names, dynamic = models.transformer("bert", "eager")
    path = models.export(module, args, names, dynamic, tmp / "bert.onnx", "dynamo")
    result = graphopt.optimize(path, dims={"batch": 2, "seq": 16}, explain=True)
    record = next(p for p in result.report.passes if p.name == "pre-rmsnorm")
    assert record.rewrites == {"PreLNToPreRMSNorm": 0}
    assert any("Post-LN" in line for line in record.near_misses), record.near_misses
