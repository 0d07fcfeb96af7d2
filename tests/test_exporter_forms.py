"""Issue 27 item 3: the forms jax2tf (Flax) and Paddle (paddle2onnx) exporters write, each a
reduced copy of the pattern found in a real model (magika's jax2tf classifier, PP-OCRv4's
recognizer), fused exactly: reductions that drop their axes and broadcast them back
(restore-keepdims), sums times 1/n (SumToMean), Flax's moments LayerNorm with the scale
multiplied into the inverse, the nested tanh-GELU cube, the decomposed softmax, Paddle's
x * sigmoid(x * 1) swish, Reshape targets computed from Shape through Casts and Slices
(shape refinement), and attention whose q, k and v are slices or splits of one tensor."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt import registry
from graphopt.ir import ir
from graphopt.library.attention import is_canonical
from graphopt.passes.attention import detect
from graphopt.shapes import infer_shapes, shape_tensor
from rule_testing import apply, assert_equivalent, assert_explained, build, header, ops_of

D = 16
BATCH = 3
# jax2tf's broadcast back of a [B] result to [B, 1]: the target is computed from Shape.
KEEP_SHAPE = """shape = Shape(x)
    s0 = Constant<value = int64[1] {0}>()
    s1 = Constant<value = int64[1] {1}>()
    batch = Slice(shape, s0, s1)
    b32 = Cast<to = 6>(batch)
    one = Constant<value = int32[1] {1}>()
    kshape32 = Concat<axis = 0>(b32, one)
    kshape = Cast<to = 7>(kshape32)"""


def flax_layer_norm(clamp="Max(zero, diff)", inv_n=1 / D, w_shape=f"{D}", reduce_axes="1", opset=15) -> str:
    """magika's LayerNorm_1, reduced: keepdims=0 sums, 1/n factors, the moments variance
    clamped at 0, Reshape + Expand back, the scale multiplied into the inverse first."""
    return header(opset) + f"""
g (float[B, {D}] x) => (float[B, {D}] y) <float[{w_shape}] gamma, float[{D}] beta> {{
    {KEEP_SHAPE}
    axes = Constant<value = int64[1] {{{reduce_axes}}}>()
    sum = ReduceSum<keepdims = 0, noop_with_empty_axes = 1>(x, axes)
    sq = Mul(x, x)
    sum2 = ReduceSum<keepdims = 0, noop_with_empty_axes = 1>(sq, axes)
    inv_n = Constant<value = float {{{inv_n}}}>()
    mean = Mul(sum, inv_n)
    msq = Mul(sum2, inv_n)
    mean2 = Mul(mean, mean)
    diff = Sub(msq, mean2)
    zero = Constant<value = float {{0.0}}>()
    var = {clamp}
    var_r = Reshape(var, kshape)
    var_b = Expand(var_r, kshape)
    eps = Constant<value = float {{1e-6}}>()
    ve = Add(var_b, eps)
    std = Sqrt(ve)
    inv = Reciprocal(std)
    scaled = Mul(inv, gamma)
    mean_r = Reshape(mean, kshape)
    mean_b = Expand(mean_r, kshape)
    d = Sub(x, mean_b)
    n = Mul(d, scaled)
    y = Add(n, beta)
}}"""


def feeds(*shape, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3 + 1}


def test_restore_keepdims_then_flax_layer_norm_fuses():
    original = build(flax_layer_norm(), gamma=[D], beta=[D])
    kept, counts = apply("restore-keepdims", original)
    assert counts == {"RestoreKeepDims": 2}
    assert "Reshape" not in ops_of(kept) and "Expand" not in ops_of(kept)
    assert_equivalent(original, kept, inputs=feeds(BATCH, D))
    fused, counts = apply("fuse-norms", kept)
    assert counts == {"SumToMean": 2, "FuseLayerNorm": 1, "FuseRMSNorm": 0, "FoldCastIslandIntoNorm": 0, "AbsorbNormAffine": 1}
    assert ops_of(fused) == {"LayerNormalization": 1}
    assert_equivalent(original, fused, inputs=feeds(BATCH, D))


def test_flax_layer_norm_without_the_clamp_and_in_the_exact_preset():
    original = build(flax_layer_norm(clamp="Identity(diff)"), gamma=[D], beta=[D])
    result = graphopt.optimize(original, preset="exact", inputs=feeds(BATCH, D))
    assert result.passed and result.report.validation is not None
    assert ops_of(result.model) == {"LayerNormalization": 1}


def _negative(text, shapes, name, rule, reason, count_key):
    model = build(text, **shapes)
    kept, _ = apply("restore-keepdims", model)
    after, counts = apply(name, kept)
    assert counts[count_key] == 0
    # --explain reports on the pass's input: the FuseLayerNorm refusals show once SumToMean ran.
    assert_explained(name, kept if rule == "SumToMean" else after, rule, reason)


def test_flax_layer_norm_negatives():
    shapes = {"gamma": [D], "beta": [D]}
    # SumToMean 2: the factor is not 1/n.
    _negative(flax_layer_norm(inv_n=0.5), shapes, "fuse-norms", "SumToMean", "the identity needs 0.0625", "SumToMean")
    # FuseLayerNorm 1: the clamp is not 0.
    text = flax_layer_norm().replace("zero = Constant<value = float {0.0}>()", "zero = Constant<value = float {0.5}>()")
    _negative(text, shapes, "fuse-norms", "FuseLayerNorm", "the clamp is 0.5", "FuseLayerNorm")
    # FuseLayerNorm 6: the scale multiplied into the inverse varies along another axis.
    text = flax_layer_norm(w_shape=f"{BATCH}, 1").replace(f"(float[B, {D}] x) => (float[B, {D}] y)", f"(float[{BATCH}, {D}] x) => (float[{BATCH}, {D}] y)")
    _negative(text, {"gamma": [BATCH, 1], "beta": [D]}, "fuse-norms", "FuseLayerNorm", "varying along the last axis only", "FuseLayerNorm")


def keepdims_model(tail: str, outputs: str = f"float[B, {D}] y", extra_inputs: str = "") -> str:
    return header(15) + f"""
g (float[B, {D}] x{extra_inputs}) => ({outputs}) {{
    {KEEP_SHAPE}
    axes = Constant<value = int64[1] {{1}}>()
    m = ReduceMax<axes = [1], keepdims = 0>(x)
    {tail}
}}"""


RESTORE_NEGATIVES = [
    # 1: the axes are not constant.
    (keepdims_model("""t = ReduceSum<keepdims = 0>(x, dyn)
    tr = Reshape(t, kshape)
    y = Sub(x, tr)""", extra_inputs=", int64[1] dyn").replace("m = ReduceMax<axes = [1], keepdims = 0>(x)", ""), "not known constants"),
    # 2: a reader needs the dims dropped (the [B] result is an output).
    (keepdims_model("""r = Reshape(m, kshape)
    y = Sub(x, r)""", outputs=f"float[B, {D}] y, float[B] m"), "graph output"),
    # 2: combined with a value that is not computed from a reduction over the same axes.
    (keepdims_model("""s = Mul(m, other)
    r = Reshape(s, kshape)
    y = Sub(x, r)""", extra_inputs=", float[B] other"), "a graph input"),
    # 2: read by an op that is neither elementwise nor a restoration.
    (keepdims_model("""u = Unsqueeze(m, axes)
    r = Reshape(m, kshape)
    y0 = Sub(x, r)
    y = Add(y0, u)"""), "needs the reduced dims dropped"),
]


@pytest.mark.parametrize("text, reason", RESTORE_NEGATIVES, ids=["axes", "output", "input", "reader"])
def test_restore_keepdims_negatives(text, reason):
    model = build(text)
    assert apply("restore-keepdims", model)[1] == {"RestoreKeepDims": 0}
    assert_explained("restore-keepdims", model, "RestoreKeepDims", reason)


def test_restore_keepdims_refuses_a_reshape_that_puts_the_axis_elsewhere():
    text = header(15) + f"""
g (float[{BATCH}, 4, {D}] x) => (float[{BATCH}, 4, {D}] y) {{
    target = Constant<value = int64[3] {{{BATCH}, 4, 1}}>()
    m = ReduceMax<axes = [1], keepdims = 0>(x)
    r = Reshape(m, target)
    y = Sub(x, r)
}}""".replace(f"float[{BATCH}, 4, {D}] x", f"float[{BATCH}, 4, 4] x").replace(f"float[{BATCH}, 4, {D}] y", f"float[{BATCH}, 4, 4] y")
    model = build(text)
    assert apply("restore-keepdims", model)[1] == {"RestoreKeepDims": 0}
    assert_explained("restore-keepdims", model, "RestoreKeepDims", "inserts unit axes other than the reduced [1]")


def softmax_model(peak="Max(floor, m)", floor="-inf", divide="y = Div(e, s)", axis=1, opset=15, rank2=True) -> str:
    """magika's output softmax, reduced (after restore-keepdims: the reductions keep the axis)."""
    shape = f"B, {D}" if rank2 else f"B, 4, {D}"
    return header(opset) + f"""
g (float[{shape}] x) => (float[{shape}] y) {{
    floor = Constant<value = float {{{floor}}}>()
    m = ReduceMax<axes = [{axis}], keepdims = 1>(x)
    peak = {peak}
    c = Sub(x, peak)
    e = Exp(c)
    {f"axes = Constant<value = int64[1] {{{axis}}}>()" if opset >= 13 else ""}
    s = {"ReduceSum<keepdims = 1>(e, axes)" if opset >= 13 else f"ReduceSum<keepdims = 1, axes = [{axis}]>(e)"}
    {divide}
}}"""


@pytest.mark.parametrize("peak", ["Max(floor, m)", "Max(m, floor)", "Identity(m)"], ids=["floor-first", "floor-second", "plain"])
@pytest.mark.parametrize("divide", ["y = Div(e, s)", "r = Reciprocal(s)\n    y = Mul(r, e)"], ids=["div", "reciprocal"])
def test_fuse_softmax(peak, divide):
    original = build(softmax_model(peak=peak, divide=divide))
    cleaned, _ = apply("eliminate-identity", original)
    model, counts = apply("fuse-activations", cleaned)
    assert counts == {"FuseGelu": 0, "FuseGeluTanh": 0, "FuseSiLU": 0, "FuseSoftmax": 1}
    assert ops_of(model) == {"Softmax": 1}
    assert_equivalent(original, model, inputs=feeds(BATCH, D))


def test_fuse_softmax_over_a_middle_axis_at_opset_13():
    original = build(softmax_model(axis=1, opset=13, rank2=False))
    model, counts = apply("fuse-activations", original)
    assert counts["FuseSoftmax"] == 1
    assert next(n for n in model.graph if n.op_type == "Softmax").attributes.get_int("axis") == 1
    assert_equivalent(original, model, inputs=feeds(BATCH, 4, D))


SOFTMAX_NEGATIVES = [
    # 1: the sum is over another axis than the maximum.
    (softmax_model().replace("s = ReduceSum<keepdims = 1>(e, axes)", "axes0 = Constant<value = int64[1] {0}>()\n    s = ReduceSum<keepdims = 1>(e, axes0)"), "do not reduce one same axis"),
    # 2: the clamp is finite.
    (softmax_model(floor="0.0"), "clamped at 0.0, not -inf"),
    # 3: below opset 13, an axis other than the last.
    (softmax_model(axis=1, opset=12, rank2=False), "axis 1 is not the last"),
]


@pytest.mark.parametrize("text, reason", SOFTMAX_NEGATIVES, ids=["axes", "clamp", "opset"])
def test_fuse_softmax_negatives(text, reason):
    model = build(text)
    assert apply("fuse-activations", model)[1]["FuseSoftmax"] == 0
    assert_explained("fuse-activations", model, "FuseSoftmax", reason)


def test_magika_model_is_fully_fused():
    """The real model the forms above come from, if its wheel is installed (make test installs it)."""
    from test_real_models import path_of

    source = graphopt.load(path_of("magika"))
    result = graphopt.optimize(source, preset="exact")
    assert result.passed and result.report.validation is not None
    counts = ops_of(result.model)
    # LayerNorm_1 normalizes the last axis; LayerNorm_0 normalizes axis 1 of three and stays decomposed.
    assert counts["LayerNormalization"] == 1 and counts["GeluTanh"] == 2 and counts["Softmax"] == 1
    assert counts["Expand"] == 1  # only the one-hot's broadcast is left
    explain = registry.get("fuse-norms").near_misses(result.model.ir)
    assert any("not only the last one" in line for line in explain), explain


def paddle_attention(qkv="slice", heads=2, head=4, seq=5) -> str:
    """PP-OCRv4's attention, reduced: one projection, a Reshape whose target is computed from
    Shape through Casts and Concats (onnx's inference loses its output shape), Transpose
    [2, 0, 3, 1, 4], then q, k and v sliced (or split) out of the one tensor."""
    c = heads * head
    if qkv == "slice":
        take = "\n    ".join(
            f"st{i} = Constant<value = int64[1] {{{i}}}>()\n    en{i} = Constant<value = int64[1] {{{i + 1}}}>()\n"
            f"    sl{i} = Slice(qkv, st{i}, en{i}, zero)\n    {name} = Squeeze(sl{i}, zero)"
            for i, name in enumerate(("q", "k", "v")))
    else:
        take = "sq, sk, sv = Split<axis = 0, num_outputs = 3>(qkv)\n    q = Squeeze(sq, zero)\n    k = Squeeze(sk, zero)\n    v = Squeeze(sv, zero)"
    return header(18) + f"""
g (float[B, {seq}, {c}] x) => (float[B, {seq}, {c}] y) <float[{c}, {3 * c}] w_qkv, float[{c}, {c}] w_out> {{
    proj = MatMul(x, w_qkv)
    shape = Shape(x)
    zero = Constant<value = int64[1] {{0}}>()
    one = Constant<value = int64[1] {{1}}>()
    two = Constant<value = int64[1] {{2}}>()
    seq = Slice(shape, one, two)
    seq32 = Cast<to = 6>(seq)
    dims32 = Constant<value = int32[3] {{3, {heads}, {head}}}>()
    zero32 = Constant<value = int32[1] {{0}}>()
    target32 = Concat<axis = 0>(zero32, seq32, dims32)
    target = Cast<to = 7>(target32)
    r = Reshape(proj, target)
    qkv = Transpose<perm = [2, 0, 3, 1, 4]>(r)
    {take}
    scale = Constant<value = float {{{head ** -0.5}}}>()
    qs = Mul(q, scale)
    kt = Transpose<perm = [0, 1, 3, 2]>(k)
    scores = MatMul(qs, kt)
    p = Softmax<axis = 3>(scores)
    o = MatMul(p, v)
    ot = Transpose<perm = [0, 2, 1, 3]>(o)
    c120 = Constant<value = int32[1] {{{c}}}>()
    out32 = Concat<axis = 0>(zero32, seq32, c120)
    out_shape = Cast<to = 7>(out32)
    merged = Reshape(ot, out_shape)
    y = MatMul(merged, w_out)
}}"""


def test_reshape_targets_computed_through_casts_and_slices_get_shapes():
    model = build(paddle_attention(), w_qkv=[8, 24], w_out=[8, 8])
    infer_shapes(model.ir)
    values = ir.convenience.create_value_mapping(model.graph)
    assert shape_tensor(values["target"]) == [0, 5, 3, 2, 4]
    assert values["r"].shape == ir.Shape(["B", 5, 3, 2, 4])
    assert values["q"].shape == ir.Shape(["B", 2, 5, 4]) and values["merged"].shape == ir.Shape(["B", 5, 8])


@pytest.mark.parametrize("qkv", ["slice", "split"])
def test_attention_on_slices_of_one_tensor_is_found_and_fused(qkv):
    original = build(paddle_attention(qkv), w_qkv=[8, 24], w_out=[8, 8])
    work = original.clone()
    infer_shapes(work.ir)
    (site,) = detect.find_attention(work.graph)
    assert (site.heads, site.head_size) == (2, 4)
    fused, counts = apply("fuse-attention", original)
    assert counts == {"FuseAttention": 1}
    assert sum(is_canonical(n) for n in fused.graph) == 1
    assert_equivalent(original, fused, inputs=feeds(BATCH, 5, 8))


def test_paddle_swish_times_one_becomes_silu():
    text = header(15) + f"""
g (float[B, {D}] x_in) => (float[B, {D}] y) {{
    x = Relu(x_in)
    one = Constant<value = float[1] {{1.0}}>()
    xs = Mul(x, one)
    s = Sigmoid(xs)
    y = Mul(x, s)
}}"""
    original = build(text)
    cleaned, counts = apply("eliminate-identity", original)
    assert counts["RemoveUnitFactor"] == 1
    fused, counts = apply("fuse-activations", cleaned)
    assert counts["FuseSiLU"] == 1
    assert_equivalent(original, fused, inputs={"x_in": feeds(BATCH, D)["x"]})


UNIT_NEGATIVES = [
    # 1: the factor is not 1.
    ("Constant<value = float[1] {2.0}>()", "x", "is not a constant 1"),
    # 2: the factor's rank would add a dimension.
    ("Constant<value = float[1, 1, 1] {1.0}>()", "x", "may add a dimension"),
    # 3: x is a graph input and the product a graph output.
    ("Constant<value = float[1] {1.0}>()", "out", "graph input"),
]


@pytest.mark.parametrize("factor, output, reason", UNIT_NEGATIVES, ids=["two", "rank", "forwarding"])
def test_unit_factor_negatives(factor, output, reason):
    out_shape = f"1, B, {D}" if "1, 1, 1" in factor else f"B, {D}"
    tail = "y = Relu(xs)" if output == "x" else "y = Identity(xs)"
    text = header(15) + f"""
g (float[B, {D}] x) => (float[{out_shape}] {"y" if output == "x" else "xs"}) {{
    one = {factor}
    xs = Mul(x, one)
    {tail if output == "x" else ""}
}}"""
    model = build(text)
    assert apply("eliminate-identity", model)[1]["RemoveUnitFactor"] == 0
    assert_explained("eliminate-identity", model, "RemoveUnitFactor", reason)


def test_one_over_x_is_not_a_unit_factor():
    """Div is not commutative: 1 / x stays (x / 1 is the identity)."""
    text = header(15) + f"""
g (float[B, {D}] x_in) => (float[B, {D}] y) {{
    x = Relu(x_in)
    one = Constant<value = float[1] {{1.0}}>()
    y = Div(one, x)
}}"""
    model = build(text)
    assert apply("eliminate-identity", model)[1]["RemoveUnitFactor"] == 0
