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


def _vit_like(arch: str):
    """ViT / DeiT (tiny), with LayerNorm parameters, class (and distillation) tokens and
    position embeddings perturbed as trained ones are, so every re-centred writer matters."""
    import torch
    import transformers

    config = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                  patch_size=8, attn_implementation="eager")
    torch.manual_seed(0)
    model = (transformers.ViTModel(transformers.ViTConfig(**config)) if arch == "vit" else
             transformers.DeiTModel(transformers.DeiTConfig(**config))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "token" in name or "position" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return models.PixelLastHidden(model), (torch.randn(2, 3, 32, 32),), ["pixel_values"], {"pixel_values": {0: "batch"}}


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("arch", ["vit", "deit"])
def test_vit_style_streams_become_pre_rmsnorm(arch, exporter, tmp):
    """The stream starts at Concat(class token(s), patch Conv) + position embeddings: the Conv's
    output channels, the tokens and the position table are re-centred, every LayerNorm converts."""
    module, args, names, dynamic = _vit_like(arch)
    path = models.export(module, args, names, dynamic, tmp / f"{arch}.onnx", exporter)
    result = graphopt.optimize(path, dims={"batch": 2})
    assert result.report.validation.passed, result.report.validation.to_dict()
    assert result.report.rewrites()["PreLNToPreRMSNorm"] == 5  # 2 per block + the final one
    assert ops_of(result.model)["RMSNormalization"] == 5 and "LayerNormalization" not in ops_of(result.model)


def test_a_concat_along_the_hidden_axis_is_refused():
    text = header(21) + """
g (float[2, 5, 4] a) => (float[2, 5, 8] y) <float[2, 5, 4] t, float[8] g1, float[8] b1, float[8, 8] w1, float[8] gf, float[8] bf> {
    x0 = Concat<axis = 2>(a, t)
    n1 = LayerNormalization(x0, g1, b1)
    h = MatMul(n1, w1)
    x1 = Add(x0, h)
    y = LayerNormalization(x1, gf, bf)
}"""
    model = build(text, t=[2, 5, 4], g1=[8], b1=[8], w1=[8, 8], gf=[8], bf=[8])
    assert apply("pre-rmsnorm", model)[1] == {"PreLNToPreRMSNorm": 0}
    assert_explained("pre-rmsnorm", model, "PreLNToPreRMSNorm", "concatenates along the hidden axis")
