"""Q/K/V merge and attention-scale fold: exact counts, equivalence, negatives."""

from __future__ import annotations

import pytest

from rule_testing import apply, assert_equivalent, assert_explained, build, header, ops_of

QKV = header(21) + """
g (float[2, 6, 8] x) => (float[2, 6, 8] q, float[2, 6, 4] k, float[2, 6, 4] v) <float[8, 8] wq, float[8] bq, float[8, 4] wk, float[8, 4] wv, float[4] bv> {
    q0 = MatMul(x, wq)
    q1 = Add(q0, bq)
    q = Relu(q1)
    k0 = MatMul(x, wk)
    k = Relu(k0)
    v0 = MatMul(x, wv)
    v1 = Add(bv, v0)
    v = Relu(v1)
}"""
QKV_SHAPES = dict(wq=[8, 8], bq=[8], wk=[8, 4], wv=[8, 4], bv=[4])


def test_merge_parallel_linears_gqa_widths_and_mixed_bias():
    original = build(QKV, **QKV_SHAPES)
    model, counts = apply("merge-parallel-linears", original)
    assert counts == {"MergeParallelLinears": 1}
    assert ops_of(model) == {"MatMul": 1, "Add": 1, "Split": 1, "Relu": 3}
    assert_equivalent(original, model)
    assert apply("merge-parallel-linears", model)[1] == {"MergeParallelLinears": 0}


def test_merge_parallel_linears_negatives():
    # 2. A weight that is not constant (the K projection reads a graph input).
    text = QKV.replace("(float[2, 6, 8] x)", "(float[2, 6, 8] x, float[8, 4] wk)").replace("float[8, 4] wk, ", "")
    model = build(text, **{k: v for k, v in QKV_SHAPES.items() if k != "wk"})
    assert apply("merge-parallel-linears", model)[1] == {"MergeParallelLinears": 1}  # Q and V still merge
    assert_explained("merge-parallel-linears", model, "MergeParallelLinears", "'wk' is not a constant matrix")
    # 1. Only one projection left: nothing to merge.
    text = text.replace("v0 = MatMul(x, wv)", "v0 = MatMul(q1, wv2)").replace("float[8, 4] wv,", "float[8, 4] wv2,")
    model = build(text, wq=[8, 8], bq=[8], wv2=[8, 4], bv=[4])
    assert apply("merge-parallel-linears", model)[1] == {"MergeParallelLinears": 0}
    # 3. A branch output that is a graph output.
    text = QKV.replace("=> (float[2, 6, 8] q,", "=> (float[2, 6, 4] k0, float[2, 6, 8] q,")
    model = build(text, **QKV_SHAPES)
    assert apply("merge-parallel-linears", model)[1] == {"MergeParallelLinears": 1}  # Q and V only
    assert_explained("merge-parallel-linears", model, "MergeParallelLinears", "'k0' is a graph output")


def attention(scale_line: str, rope: bool = False, extra_out: str = "") -> str:
    rotate = """
    c = Cos(pos)
    s = Sin(pos)
    qc = Mul(qh, c)
    q1 = Slice(qh, z, h, ax)
    q2 = Slice(qh, h, f, ax)
    nq2 = Neg(q2)
    rot = Concat<axis = -1>(nq2, q1)
    qs = Mul(rot, s)
    qr = Add(qc, qs)""" if rope else "\n    qr = Identity(qh)"
    return header(21) + f"""
g (float[2, 6, 8] x, float[6, 4] pos) => (float[2, 2, 6, 6] p{extra_out}) <float[8, 8] wq, float[8] bq, float[8, 8] wk, int64[4] heads = {{2, 6, 2, 4}}, int64[1] z = {{0}}, int64[1] h = {{2}}, int64[1] f = {{4}}, int64[1] ax = {{-1}}> {{
    q0 = MatMul(x, wq)
    q1a = Add(q0, bq)
    qv = Reshape(q1a, heads)
    qh = Transpose<perm = [0, 2, 1, 3]>(qv){rotate}
    k0 = MatMul(x, wk)
    kv = Reshape(k0, heads)
    kt = Transpose<perm = [0, 2, 3, 1]>(kv)
    scores = MatMul(qr, kt)
    {scale_line}
    p = Softmax<axis = -1>(scaled)
}}"""


SCALES = {
    "mul-scores": "k = Constant<value = float {0.5}>()\n    scaled = Mul(scores, k)",
    "div-scores": "k = Constant<value = float {2.0}>()\n    scaled = Div(scores, k)",
}


@pytest.mark.parametrize("scale", sorted(SCALES))
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_fold_attention_scale(scale, rope):
    original = build(attention(SCALES[scale], rope), wq=[8, 8], bq=[8], wk=[8, 8])
    model, counts = apply("fold-attention-scale", original)
    assert counts == {"FoldAttentionScale": 1}
    assert "Div" not in ops_of(model) and ops_of(model)["Mul"] == (2 if rope else 0)
    assert_equivalent(original, model, dims={"seq": 6})


def test_fold_attention_scale_negatives():
    shapes = dict(wq=[8, 8], bq=[8], wk=[8, 8])
    # 3. A value on the path is read outside it (the projection output is also a graph output).
    text = attention(SCALES["mul-scores"], extra_out=", float[2, 6, 8] q1a")
    model = build(text, **shapes)
    assert apply("fold-attention-scale", model)[1] == {"FoldAttentionScale": 0}
    assert_explained("fold-attention-scale", model, "FoldAttentionScale", "'q1a' is a graph output")
    # 2. A non-linear op between projection and scale.
    text = attention(SCALES["mul-scores"]).replace("qr = Identity(qh)", "qr = Tanh(qh)")
    model = build(text, **shapes)
    assert apply("fold-attention-scale", model)[1]["FoldAttentionScale"] == 0
    assert_explained("fold-attention-scale", model, "FoldAttentionScale", "Tanh")
    # 1. A scale that is not a scalar constant (a per-position tensor) is not a candidate at all.
    text = attention("k = Constant<value = float[6] {1, 2, 3, 4, 5, 6}>()\n    scaled = Mul(scores, k)")
    model = build(text, **shapes)
    assert apply("fold-attention-scale", model)[1]["FoldAttentionScale"] == 0


NORM_READERS = header(21) + """
g (float[2, 6, 8] x) => (float[2, 6, 4] a, float[2, 6, 4] b, float[12, 4] c) <float[8] gamma, float[8] beta, float[8, 4] w1, float[4] b1, float[8, 4] w2, float[4, 8] w3, float[4] b3, int64[2] flat = {12, 8}> {
    n = LayerNormalization<epsilon = 1e-5>(x, gamma, beta)
    m1 = MatMul(n, w1)
    a = Add(m1, b1)
    b = MatMul(n, w2)
    nf = Reshape(n, flat)
    c = Gemm<transB = 1, alpha = 0.5, beta = 2.0>(nf, w3, b3)
}"""
NORM_SHAPES = dict(gamma=[8], beta=[8], w1=[8, 4], b1=[4], w2=[8, 4], w3=[4, 8], b3=[4])


def test_fold_norm_affine_into_every_linear_reader():
    original = build(NORM_READERS, **NORM_SHAPES)
    model, counts = apply("fold-norm-affine", original)
    assert counts == {"FoldNormAffineIntoLinear": 1}
    norm = next(n for n in model.graph if n.op_type == "LayerNormalization")
    from graphopt.passes._weights import const_array

    assert (const_array(norm.inputs[1]) == 1).all() and (const_array(norm.inputs[2]) == 0).all()
    assert ops_of(model)["Add"] == 2  # the bias-free MatMul got beta @ W as a new Add
    assert_equivalent(original, model)
    assert apply("fold-norm-affine", model)[1] == {"FoldNormAffineIntoLinear": 0}


def test_fold_norm_affine_negatives():
    # 2. A reader that is not linear (a residual Add, as in Post-LN BERT).
    text = NORM_READERS.replace("b = MatMul(n, w2)", "b0 = MatMul(n, w2)\n    r = Slice(x, z, f, ax)\n    b = Add(b0, r)")
    text = text.replace("int64[2] flat = {12, 8}>", "int64[2] flat = {12, 8}, int64[1] z = {0}, int64[1] f = {4}, int64[1] ax = {-1}>")
    model = build(text.replace("    nf = Reshape(n, flat)", "    q = Add(n, x)\n    nf = Reshape(q, flat)"), **NORM_SHAPES)
    assert apply("fold-norm-affine", model)[1] == {"FoldNormAffineIntoLinear": 0}
    assert_explained("fold-norm-affine", model, "FoldNormAffineIntoLinear", "not a linear layer on its last axis")
    # 3. The norm output is a graph output.
    model = build(NORM_READERS.replace("=> (float[2, 6, 4] a,", "=> (float[2, 6, 8] n, float[2, 6, 4] a,"), **NORM_SHAPES)
    assert apply("fold-norm-affine", model)[1] == {"FoldNormAffineIntoLinear": 0}
    assert_explained("fold-norm-affine", model, "FoldNormAffineIntoLinear", "'n' is a graph output")
    # 1. A norm over more than the last axis.
    text = NORM_READERS.replace("LayerNormalization<epsilon = 1e-5>", "LayerNormalization<axis = 1>").replace("float[8] gamma, float[8] beta", "float[6, 8] gamma, float[6, 8] beta")
    model = build(text, **dict(NORM_SHAPES, gamma=[6, 8], beta=[6, 8]))
    assert apply("fold-norm-affine", model)[1] == {"FoldNormAffineIntoLinear": 0}
    assert_explained("fold-norm-affine", model, "FoldNormAffineIntoLinear", "more than the last axis")


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_fold_norm_affine_on_gpt2_with_trained_like_norms(exporter, tmp):
    """GPT-2 is Pre-LN: ln_1 and ln_2 feed only linear layers (through Reshapes); ln_f is the output."""
    import graphopt
    import models

    module, args, names, dynamic = models.gpt2_with_trained_like_norms()
    path = models.export(module, args, names, dynamic, tmp / "gpt2.onnx", exporter)
    result = graphopt.optimize(path, dims={"batch": 2, "seq": 16})
    assert result.report.validation.passed
    assert result.report.rewrites()["FoldNormAffineIntoLinear"] == 2 * 2


CHAIN = header(21) + """
g (float[2, 5, 8] x) => (float[2, 5, 6] y) <float[8, 8] a, float[8] ab, float[8, 6] b> {
    h = MatMul(x, a)
    hb = Add(h, ab)
    y = MatMul(hb, b)
}"""


@pytest.mark.parametrize("bias", [True, False])
def test_merge_matmul_chain(bias):
    text = CHAIN if bias else CHAIN.replace("hb = Add(h, ab)", "hb = Identity(h)")
    original = build(text, a=[8, 8], ab=[8], b=[8, 6])
    if not bias:
        original = build(CHAIN.replace("    hb = Add(h, ab)\n", "").replace("MatMul(hb, b)", "MatMul(h, b)"), a=[8, 8], ab=[8], b=[8, 6])
    model, counts = apply("merge-linear-chains", original)
    assert counts == {"MergeMatMulChain": 1, "FoldScaleIntoMatMul": 0, "MergeBiasAdds": 0}
    assert ops_of(model) == ({"MatMul": 1, "Add": 1} if bias else {"MatMul": 1})
    assert_equivalent(original, model)


def test_merge_matmul_chain_keeps_low_rank_factorizations():
    text = CHAIN.replace("float[8, 8] a, float[8] ab, float[8, 6] b", "float[8, 2] a, float[2] ab, float[2, 6] b")
    model = build(text, a=[8, 2], ab=[2], b=[2, 6])
    assert apply("merge-linear-chains", model)[1]["MergeMatMulChain"] == 0
    assert_explained("merge-linear-chains", model, "MergeMatMulChain", "rank-2 factorization")


def test_fold_scale_and_bias_chains():
    text = header(21) + """
g (float[2, 5, 8] x) => (float[2, 5, 6] y) <float[8, 6] w, float[6] b, float[6] s, float[6] c> {
    m = MatMul(x, w)
    mb = Add(b, m)
    ms = Mul(s, mb)
    y = Add(ms, c)
}"""
    original = build(text, w=[8, 6], b=[6], s=[6], c=[6])
    model, counts = apply("merge-linear-chains", original)
    assert counts == {"MergeMatMulChain": 0, "FoldScaleIntoMatMul": 1, "MergeBiasAdds": 1}
    assert ops_of(model) == {"MatMul": 1, "Add": 1}
    assert_equivalent(original, model)
    # A scale varying along another axis is not a column scale.
    bad = build(text.replace("float[6] s,", "float[5, 1] s,"), w=[8, 6], b=[6], s=[5, 1], c=[6])
    assert apply("merge-linear-chains", bad)[1]["FoldScaleIntoMatMul"] == 0
    assert_explained("merge-linear-chains", bad, "FoldScaleIntoMatMul", "varying along the last axis only")
