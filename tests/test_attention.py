"""fuse-attention: exported attention becomes one canonical op, exactly.

Hand-written graphs pin each precondition; torch modules (nn.MultiheadAttention,
F.scaled_dot_product_attention) and cached decoders cover what exporters emit. The
transformers matrix (8 architectures x 2 exporters x eager/SDPA) is in test_model_matrix.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphopt
import models
from graphopt.library.attention import is_canonical
from rule_testing import apply, assert_equivalent, assert_explained, build, header

B, H, S, D = 2, 4, 8, 16
QKV = f"float[{B},{H},{S},{D}] q, float[{B},{H},{S},{D}] k, float[{B},{H},{S},{D}] v"


def _graph(middle: str, inputs: str = "", after: str = "y = MatMul(p, v)", outputs: str = f"float[{B},{H},{S},{D}] y") -> str:
    return header(18) + f"""
agraph ({QKV}{inputs}) => ({outputs}) {{
    kt = Transpose<perm = [0, 1, 3, 2]>(k)
    scores = MatMul(q, kt)
    {middle}
    {after}
}}"""


def _canonical(model) -> list:
    return [n for n in model.graph if is_canonical(n)]


def _check(text: str, feeds=None, **expect):
    model = build(text)
    work, counts = apply("fuse-attention", model)
    assert counts == {"FuseAttention": 1}
    (node,) = _canonical(work)
    for key, value in expect.items():
        attr = node.attributes[key].value
        assert (attr == pytest.approx(value) if isinstance(value, float) else attr == value), (key, attr)
    assert_equivalent(model, work, inputs=feeds)
    return work


def test_scaled_additive_mask():
    text = _graph("""c = Constant<value = float {0.25}>()
    scaled = Mul(scores, c)
    masked = Add(scaled, bias)
    p = Softmax<axis = -1>(masked)""", inputs=f", float[{B},1,{S},{S}] bias")
    work = _check(text, scale=0.25, mask="additive")
    assert _canonical(work)[0].op_type == "MaskedAttention"


def test_split_scale_on_q_and_k_without_mask():
    text = header(18) + f"""
agraph ({QKV}) => (float[{B},{H},{S},{D}] y) {{
    c = Constant<value = float {{0.5}}>()
    qs = Mul(q, c)
    kt = Transpose<perm = [0, 1, 3, 2]>(k)
    kts = Mul(kt, c)
    scores = MatMul(qs, kts)
    p = Softmax<axis = -1>(scores)
    y = MatMul(p, v)
}}"""
    work = _check(text, scale=0.25, mask="none")
    assert _canonical(work)[0].op_type == "Attention"


def test_boolean_mask_with_sdpa_nan_guard_on_fully_masked_rows():
    """Where(m, scores, -inf) then SDPA's guard: a fully masked query row is 0 in both graphs."""
    text = _graph("""fill = Constant<value = float {-inf}>()
    d = Constant<value = float {4.0}>()
    scaled = Div(scores, d)
    masked = Where(m, scaled, fill)
    p0 = Softmax<axis = -1>(masked)
    nan = IsNaN(p0)
    zero = Constant<value = float {0.0}>()
    p = Where(nan, zero, p0)""", inputs=f", bool[{B},1,{S},{S}] m")
    rng = np.random.default_rng(0)
    m = rng.random((B, 1, S, S)) > 0.3
    m[0, 0, 2, :] = False  # a query that sees nothing: NaN before the guard
    feeds = {name: rng.standard_normal((B, H, S, D)).astype(np.float32) for name in "qkv"} | {"m": m}
    work = _check(text, feeds, scale=0.25, mask="boolean")
    out = graphopt.verify.run(work, feeds)["y"]
    assert np.all(out[0, :, 2] == 0) and np.isfinite(out).all()


def test_causal_mask_is_classified():
    text = _graph("""masked = Add(scores, bias)
    p = Softmax<axis = -1>(masked)""", inputs=f", float[{B},{H},{S},{D}] unused")
    # a causal bias built in the graph from a constant lower-triangular pattern
    text = text.replace("masked = Add(scores, bias)", f"""ones = Constant<value = float[{S},{S}] {{{", ".join(["1.0"] * S * S)}}}>()
    tri = Trilu<upper = 0>(ones)
    neg = Constant<value = float {{-3.4e38}}>()
    zero = Constant<value = float {{0.0}}>()
    one = Constant<value = float {{1.0}}>()
    visible = Equal(tri, one)
    bias = Where(visible, zero, neg)
    masked = Add(scores, bias)""")
    _check(text, causal=1, mask="additive")


def test_padding_mask_is_not_causal():
    text = _graph("""masked = Add(scores, bias)
    p = Softmax<axis = -1>(masked)""", inputs=f", float[{B},1,1,{S}] bias")
    _check(text, causal=0)


def test_no_op_cast_and_dropout_on_probabilities():
    text = _graph("""p0 = Softmax<axis = -1>(scores)
    p1 = Cast<to = 1>(p0)
    p = Dropout(p1)""")
    _check(text)


# Negative tests: one per precondition.

def test_refuses_non_mask_op_between_scores_and_softmax():
    model = build(_graph("""t = Tanh(scores)
    p = Softmax<axis = -1>(t)"""))
    assert apply("fuse-attention", model)[1] == {"FuseAttention": 0}
    assert_explained("fuse-attention", model, "FuseAttention", "its input comes from Tanh")


def test_refuses_mask_before_scale():
    model = build(_graph("""masked = Add(scores, bias)
    c = Constant<value = float {0.25}>()
    scaled = Mul(masked, c)
    p = Softmax<axis = -1>(scaled)""", inputs=f", float[{B},1,{S},{S}] bias"))
    assert apply("fuse-attention", model)[1] == {"FuseAttention": 0}
    assert_explained("fuse-attention", model, "FuseAttention", "the canonical op scales before masking")


def test_refuses_tensor_scale():
    model = build(_graph("""scaled = Mul(scores, w)
    p = Softmax<axis = -1>(scaled)""", inputs=f", float[{B},{H},{S},{S}] w"))
    assert apply("fuse-attention", model)[1] == {"FuseAttention": 0}


def test_refuses_op_after_softmax():
    model = build(_graph("""p0 = Softmax<axis = -1>(scores)
    p = Mul(p0, head_mask)""", inputs=f", float[1,{H},1,1] head_mask"))
    assert apply("fuse-attention", model)[1] == {"FuseAttention": 0}
    assert_explained("fuse-attention", model, "FuseAttention", "between Softmax and the output MatMul")


def test_refuses_when_probabilities_are_an_output():
    model = build(_graph("p = Softmax<axis = -1>(scores)", outputs=f"float[{B},{H},{S},{D}] y, float[{B},{H},{S},{S}] p"))
    assert apply("fuse-attention", model)[1] == {"FuseAttention": 0}
    assert_explained("fuse-attention", model, "FuseAttention", "is a graph output")


def test_softmax_over_another_axis_is_not_attention():
    model = build(_graph("p = Softmax<axis = 2>(scores)"))
    assert apply("fuse-attention", model)[1] == {"FuseAttention": 0}


def test_second_run_fires_nothing():
    model = build(_graph("p = Softmax<axis = -1>(scores)"))
    work, counts = apply("fuse-attention", model)
    assert counts == {"FuseAttention": 1}
    assert apply("fuse-attention", work)[1] == {"FuseAttention": 0}


# What exporters emit beyond transformers.

class _TorchMHA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class _SDPA(torch.nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.qkv, self.causal = torch.nn.Linear(32, 96), causal

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("module", ["mha", "sdpa", "sdpa-causal"])
def test_torch_attention_modules(module, exporter, tmp):
    torch.manual_seed(0)
    m = (_TorchMHA() if module == "mha" else _SDPA(module == "sdpa-causal")).eval()
    path = models.export(m, (torch.randn(2, 8, 32),), ["x"], {"x": {0: "batch", 1: "seq"}}, tmp / "m.onnx", exporter)
    result = graphopt.optimize(path, dims={"batch": 2, "seq": 8})
    assert result.report.validation.passed, result.report.validation.to_dict()
    assert result.report.rewrites()["FuseAttention"] == 1
    (layer,) = graphopt.summary.attention_layers(result.model)
    assert layer["canonical"] and layer["causal"] == (module == "sdpa-causal")


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_with_kv_cache(arch, exporter, tmp):
    path = models.export_cached_decoder(arch, tmp / "m.onnx", exporter)
    result = graphopt.optimize(path, dims={"batch": 2, "seq": 4, "past": 6, "total": 10})
    assert result.report.validation.passed, result.report.validation.to_dict()
    layers = graphopt.summary.attention_layers(result.model)
    kv = 2 if arch == "llama" else 4
    assert [(a["canonical"], a["heads"], a["kv_heads"], a["causal"]) for a in layers] == [(True, 4, kv, True)] * 2
