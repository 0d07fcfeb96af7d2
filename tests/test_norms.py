"""Norm fusion: every exporter form of LayerNorm and RMSNorm, and affine absorption."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rule_testing import apply, assert_equivalent, assert_explained, build, header, ops_of

D = 16


def reduce_mean(x, out, opset, axis=-1):
    if opset >= 18:
        return f"ax_{out} = Constant<value = int64[1] {{{axis}}}>()\n    {out} = ReduceMean<keepdims = 1>({x}, ax_{out})"
    return f"{out} = ReduceMean<axes = [{axis}]>({x})"


def divide(num, std, form):
    return {
        "div": f"n = Div({num}, {std})",
        "reciprocal": f"inv = Reciprocal({std})\n    n = Mul({num}, inv)",
        "one-over": f"one = Constant<value = float {{1.0}}>()\n    inv = Div(one, {std})\n    n = Mul(inv, {num})",
    }[form]


def square(base, form):
    return f"two = Constant<value = float {{2.0}}>()\n    sq = Pow({base}, two)" if form == "pow" else f"sq = Mul({base}, {base})"


def layer_norm(form="div", sq="pow", opset=21, eps="eps = Constant<value = float {1e-5}>()", axis=-1, shape=f"2, 5, {D}", dtype="float"):
    return header(opset) + f"""
g ({dtype}[{shape}] x) => ({dtype}[{shape}] y) <{dtype}[{D}] gamma, {dtype}[{D}] beta> {{
    {reduce_mean("x", "mean", opset, axis)}
    d = Sub(x, mean)
    {square("d", sq)}
    {reduce_mean("sq", "var", opset, axis)}
    {eps}
    ve = Add(var, eps)
    std = Sqrt(ve)
    {divide("d", "std", form)}
    s = Mul(n, gamma)
    y = Add(s, beta)
}}"""


def rms_norm(form="reciprocal", sq="pow", opset=21, eps="eps = Constant<value = float {1e-6}>()"):
    return header(opset) + f"""
g (float[2, 5, {D}] x) => (float[2, 5, {D}] y) <float[{D}] w> {{
    {square("x", sq)}
    {reduce_mean("sq", "ms", opset)}
    {eps}
    ve = Add(ms, eps)
    std = Sqrt(ve)
    {divide("x", "std", form)}
    y = Mul(w, n)
}}"""


@pytest.mark.parametrize("form", ["div", "reciprocal", "one-over"])
@pytest.mark.parametrize("sq", ["pow", "mul"])
@pytest.mark.parametrize("opset, op", [(21, "LayerNormalization"), (14, "LayerNormalization")])
def test_fuse_layer_norm(form, sq, opset, op):
    original = build(layer_norm(form, sq, opset), gamma=[D], beta=[D])
    model, counts = apply("fuse-norms", original)
    assert counts == {"SumToMean": 0, "FuseLayerNorm": 1, "FuseRMSNorm": 0, "FoldCastIslandIntoNorm": 0, "AbsorbNormAffine": 2}
    assert ops_of(model) == {op: 1}
    node = next(iter(model.graph))
    assert node.domain == ("" if opset >= 17 else "graphopt")
    assert_equivalent(original, model)


@pytest.mark.parametrize("form", ["div", "reciprocal", "one-over"])
@pytest.mark.parametrize("sq", ["pow", "mul"])
@pytest.mark.parametrize("opset", [23, 20, 13])
def test_fuse_rms_norm(form, sq, opset):
    original = build(rms_norm(form, sq, opset), w=[D])
    model, counts = apply("fuse-norms", original)
    assert counts == {"SumToMean": 0, "FuseLayerNorm": 0, "FuseRMSNorm": 1, "FoldCastIslandIntoNorm": 0, "AbsorbNormAffine": 1}
    assert ops_of(model) == {"RMSNormalization": 1}
    assert next(iter(model.graph)).domain == ("" if opset >= 23 else "graphopt")
    assert_equivalent(original, model)


LN_NEGATIVES = [
    # FuseLayerNorm 1: exponent 3.
    (layer_norm().replace("float {2.0}", "float {3.0}"), "FuseLayerNorm", "the exponent is 3.0"),
    # 2: epsilon is not constant.
    (layer_norm(eps="eps = Identity(e)").replace("(float[2, 5, 16] x)", "(float[2, 5, 16] x, float e)"), "FuseLayerNorm", "not a non-negative scalar constant"),
    # 3: the reduction is not over the last axis.
    (layer_norm(axis=1, shape="2, 16, 16"), "FuseLayerNorm", "not only the last one"),
    # 4: the hidden size is dynamic.
    (layer_norm(shape="2, 5, N").replace("float[16] gamma, float[16] beta", "float[1] gamma, float[1] beta"), "FuseLayerNorm", "not static"),
    # 5: fp16 below opset 15 cannot call the graphopt function.
    (layer_norm(opset=14, dtype="float16", eps="").replace("float16[16] beta>", "float16[16] beta, float16 eps>"), "FuseLayerNorm", "float32-only"),
]


@pytest.mark.parametrize("text, rule, reason", LN_NEGATIVES, ids=["exponent", "eps", "axis", "dynamic", "fp16-opset14"])
def test_layer_norm_negatives(text, rule, reason):
    shapes = {"gamma": [1 if "N]" in text else D], "beta": [1 if "N]" in text else D]}
    if "float16" in text:
        import graphopt

        model = graphopt.load(_with_fp16_weights(text))
    else:
        model = build(text, **shapes)
    assert apply("fuse-norms", model)[1]["FuseLayerNorm"] == 0
    assert_explained("fuse-norms", model, rule, reason)


def _with_fp16_weights(text):
    import onnx

    proto = onnx.parser.parse_model(text)
    for name in ("gamma", "beta"):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(D, np.float16), name))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1e-5, np.float16), "eps"))
    return proto


def test_eps_outside_sqrt_is_not_layer_norm():
    """d / (sqrt(var) + eps) is a different function: no rule matches it."""
    text = layer_norm().replace("ve = Add(var, eps)\n    std = Sqrt(ve)", "sv = Sqrt(var)\n    std = Add(sv, eps)")
    model = build(text, gamma=[D], beta=[D])
    assert apply("fuse-norms", model)[1]["FuseLayerNorm"] == 0


def affine(norm_line: str, tail: str, w_shape=f"{D}", outputs="float[2, 5, 16] y"):
    return header(23) + f"""
g (float[2, 5, 16] x) => ({outputs}) <float[{D}] s, float[{D}] b, float[{w_shape}] w> {{
    {norm_line}
    {tail}
}}"""


def test_absorb_negatives():
    ln = "n = LayerNormalization<epsilon = 1e-5>(x, s, b)"
    cases = [
        (affine("n = LayerNormalization<axis = 1>(x, s2, b2)".replace("s2", "s").replace("b2", "b"), "y = Mul(n, w)"), "not the last axis only"),
        (affine(ln, "y = Mul(n, w)", w_shape="5, 16"), "varying along the last axis only"),
        (affine(ln, "y = Mul(n, w)", outputs="float[2, 5, 16] y, float[2, 5, 16] n"), "other uses"),
        (affine("n = RMSNormalization(x, s)", "y = Add(n, w)"), "no bias to absorb a shift"),
    ]
    for text, reason in cases:
        shapes = dict(s=[D], b=[D], w=[5, 16] if "5, 16] w" in text else [D])
        if "axis = 1" in text:
            shapes.update(s=[5, 16], b=[5, 16])
            text = text.replace("float[16] s, float[16] b", "float[5, 16] s, float[5, 16] b")
        model = build(text, **shapes)
        assert apply("fuse-norms", model)[1]["AbsorbNormAffine"] == 0, reason
        assert_explained("fuse-norms", model, "AbsorbNormAffine", reason)


@settings(max_examples=15, deadline=None)
@given(form=st.sampled_from(["div", "reciprocal", "one-over"]), eps=st.sampled_from([1e-12, 1e-6, 1e-5, 0.1]),
       seed=st.integers(0, 2**16), rms=st.booleans())
def test_norm_property(form, eps, seed, rms):
    """Random eps, weights and forms: fused == original; a second run fires nothing."""
    eps_line = f"eps = Constant<value = float {{{eps!r}}}>()"
    text = rms_norm(form, eps=eps_line) if rms else layer_norm(form, eps=eps_line)
    original = build(text, seed=seed, **({"w": [D]} if rms else {"gamma": [D], "beta": [D]}))
    model, counts = apply("fuse-norms", original)
    assert sum(counts.values()) == (2 if rms else 3)
    assert_equivalent(original, model)
    assert sum(apply("fuse-norms", model)[1].values()) == 0


def fp16_island(kind: str) -> str:
    core = layer_norm().split("{", 1)[1].rsplit("s = Mul", 1)[0] if kind == "ln" else rms_norm().split("{", 1)[1].rsplit("y = Mul", 1)[0]
    core = core.replace("(x,", "(xf,").replace("(x)", "(xf)").replace("Sub(x,", "Sub(xf,").replace("Pow(x,", "Pow(xf,").replace("Div(x,", "Div(xf,").replace(", x)", ", xf)")
    return header(21) + f"""
g (float16[2, 5, {D}] x) => (float16[2, 5, {D}] y) <float16[{D}] gamma, float16[{D}] beta> {{
    xf = Cast<to = 1>(x)
    {core.strip()}
    back = Cast<to = 10>(n)
    s = Mul(back, gamma)
    y = Add(s, beta)
}}"""


@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_fp16_cast_island_becomes_one_fp16_norm(kind):
    import onnx

    proto = onnx.parser.parse_model(fp16_island(kind))
    rng = np.random.default_rng(0)
    for name in ("gamma", "beta"):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(D).astype(np.float16), name))
    import graphopt

    original = graphopt.load(proto)
    model, counts = apply("fuse-norms", original)
    assert counts["FoldCastIslandIntoNorm"] == 1 and "Cast" not in ops_of(model)
    expected = {"LayerNormalization": 1, "Add": 0} if kind == "ln" else {"RMSNormalization": 1, "Add": 1}
    assert {k: ops_of(model)[k] for k in expected} == expected
    assert_equivalent(original, model)  # fp16 tolerance: the narrow norm rounds once less
