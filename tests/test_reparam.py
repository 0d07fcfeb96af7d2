"""Re-parameterization: BatchNorm folding and branch merging.

Positive tests assert the exact rewrite count and ORT equivalence at the default
fp32 tolerance; each precondition has a negative test that asserts nothing fired
and that --explain names the reason."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

import convnets
import graphopt
from openvino_check import assert_matches_in_openvino
from rule_testing import apply, assert_equivalent, assert_explained, build, ops_of

pytestmark = pytest.mark.filterwarnings("ignore")
HEADER = '<ir_version: 10, opset_import: ["" : 21]>\n'


def explained(name, model, rule, reason):
    assert_explained(name, model, rule, reason)


BN = "gamma, beta, mean, var"
BN_SHAPES = lambda c: dict(gamma=[c], beta=[c], mean=[c], var=[c])  # noqa: E731

CONV_BN = HEADER + f"""
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) <float[4, 3, 3, 3] w, float[4] b, float[4] gamma, float[4] beta, float[4] mean, float[4] var> {{
    c = Conv<pads = [1, 1, 1, 1]>(x, w, b)
    y = BatchNormalization<epsilon = 0.001>(c, {BN})
}}"""
CONVT_BN = HEADER + f"""
g (float[1, 4, 5, 5] x) => (float[1, 6, 10, 10] y) <float[4, 3, 2, 2] w, float[6] gamma, float[6] beta, float[6] mean, float[6] var> {{
    c = ConvTranspose<strides = [2, 2], group = 2>(x, w)
    y = BatchNormalization(c, {BN})
}}"""
GEMM_BN = HEADER + f"""
g (float[3, 5] x) => (float[3, 4] y) <float[4, 5] w, float[4] b, float[4] gamma, float[4] beta, float[4] mean, float[4] var> {{
    c = Gemm<transB = 1, alpha = 0.5, beta = 2.0>(x, w, b)
    y = BatchNormalization(c, {BN})
}}"""
MATMUL_BN = HEADER + f"""
g (float[3, 5] x) => (float[3, 4] y) <float[5, 4] w, float[4] gamma, float[4] beta, float[4] mean, float[4] var> {{
    c = MatMul(x, w)
    y = BatchNormalization(c, {BN})
}}"""


@pytest.mark.parametrize("text, shapes, op", [
    (CONV_BN, dict(w=[4, 3, 3, 3], b=[4], **BN_SHAPES(4)), "Conv"),
    (CONVT_BN, dict(w=[4, 3, 2, 2], **BN_SHAPES(6)), "ConvTranspose"),
    (GEMM_BN, dict(w=[4, 5], b=[4], **BN_SHAPES(4)), "Gemm"),
    (MATMUL_BN, dict(w=[5, 4], **BN_SHAPES(4)), "MatMul"),
], ids=["conv", "convtranspose-grouped", "gemm", "matmul"])
def test_fold_batchnorm_into_linear(text, shapes, op):
    original = build(text, **shapes)
    model, counts = apply("fold-batchnorm", original)
    assert counts == {"FoldBatchNormIntoLinear": 1, "FoldBatchNormIntoNextConv": 0}
    assert "BatchNormalization" not in ops_of(model) and ops_of(model)[op] == 1
    assert_equivalent(original, model)
    assert sum(apply("fold-batchnorm", model)[1].values()) == 0


def test_fold_batchnorm_negatives():
    shapes = dict(w=[4, 3, 3, 3], b=[4], **BN_SHAPES(4))
    # 1. Training mode.
    model = build(CONV_BN.replace("BatchNormalization<epsilon = 0.001>", "BatchNormalization<epsilon = 0.001, training_mode = 1>"), **shapes)
    assert sum(apply("fold-batchnorm", model)[1].values()) == 0
    explained("fold-batchnorm", model, "FoldBatchNormIntoLinear", "training mode")
    # 2. The weight is not constant (a graph input).
    text = CONV_BN.replace("(float[1, 3, 8, 8] x)", "(float[1, 3, 8, 8] x, float[4, 3, 3, 3] w)").replace("<float[4, 3, 3, 3] w, ", "<")
    model = build(text, b=[4], **BN_SHAPES(4))
    assert sum(apply("fold-batchnorm", model)[1].values()) == 0
    explained("fold-batchnorm", model, "FoldBatchNormIntoLinear", "not constant")
    # 3. The Conv output has another reader.
    text = CONV_BN.replace("=> (float[1, 4, 8, 8] y)", "=> (float[1, 4, 8, 8] y, float[1, 4, 8, 8] r)").replace("    y = Batch", "    r = Relu(c)\n    y = Batch")
    model = build(text, **shapes)
    assert sum(apply("fold-batchnorm", model)[1].values()) == 0
    explained("fold-batchnorm", model, "FoldBatchNormIntoLinear", "other uses")  # onnxscript's matcher says it first
    # 4. A rank-3 MatMul: BatchNorm's axis 1 is not the feature axis.
    text = MATMUL_BN.replace("float[3, 5] x", "float[2, 4, 5] x").replace("float[3, 4] y", "float[2, 4, 4] y")
    model = build(text, w=[5, 4], **BN_SHAPES(4))
    assert sum(apply("fold-batchnorm", model)[1].values()) == 0
    explained("fold-batchnorm", model, "FoldBatchNormIntoLinear", "not a rank-2 product")


PRE_BN = HEADER + f"""
g (float[1, 4, 6, 6] x) => (float[1, 6, 6, 6] y) <float[6, 2, 1, 1] w, float[6] b, float[4] gamma, float[4] beta, float[4] mean, float[4] var> {{
    r = Relu(x)
    n = BatchNormalization(r, {BN})
    y = Conv<group = 2>(n, w, b)
}}"""


def test_fold_batchnorm_into_next_conv():
    original = build(PRE_BN, w=[6, 2, 1, 1], b=[6], **BN_SHAPES(4))
    model, counts = apply("fold-batchnorm", original)
    assert counts == {"FoldBatchNormIntoLinear": 0, "FoldBatchNormIntoNextConv": 1}
    assert ops_of(model) == {"Relu": 1, "Conv": 1}
    assert_equivalent(original, model)


def test_fold_batchnorm_into_next_conv_negatives():
    shapes = dict(w=[6, 2, 3, 3], b=[6], **BN_SHAPES(4))
    # 4. The Conv pads its input (zeros padded after BN are not BN of zeros).
    text = PRE_BN.replace("float[6, 2, 1, 1] w", "float[6, 2, 3, 3] w").replace("Conv<group = 2>", "Conv<group = 2, pads = [1, 1, 1, 1]>")
    model = build(text, **shapes)
    assert sum(apply("fold-batchnorm", model)[1].values()) == 0
    explained("fold-batchnorm", model, "FoldBatchNormIntoNextConv", "pads its input")
    # 3. The BatchNorm output has another reader.
    text = PRE_BN.replace("=> (float[1, 6, 6, 6] y)", "=> (float[1, 6, 6, 6] y, float[1, 4, 6, 6] n)")
    model = build(text, w=[6, 2, 1, 1], b=[6], **BN_SHAPES(4))
    assert sum(apply("fold-batchnorm", model)[1].values()) == 0
    explained("fold-batchnorm", model, "FoldBatchNormIntoNextConv", "other uses")


def parallel(k1, p1, k2, p2, *, s1=1, s2=1, g=1, c=4, extra=""):
    return HEADER + f"""
g (float[1, {c}, 9, 9] x) => (float[1, {c}, 9, 9] y) <float[{c}, {c // g}, {k1[0]}, {k1[1]}] w1, float[{c}] b1, float[{c}, {c // g}, {k2[0]}, {k2[1]}] w2> {{
    a = Conv<pads = {list(p1)}, strides = [{s1}, {s1}], group = {g}>(x, w1, b1)
    b = Conv<pads = {list(p2)}, strides = [{s2}, {s2}], group = {g}>(x, w2)
    y = Add(a, b){extra}
}}"""


@pytest.mark.parametrize("k1, p1, k2, p2, g", [
    ((3, 3), (1, 1, 1, 1), (1, 1), (0, 0, 0, 0), 1),    # RepVGG
    ((1, 3), (0, 1, 0, 1), (3, 1), (1, 0, 1, 0), 1),    # ACB asymmetric pair
    ((3, 3), (1, 1, 1, 1), (5, 5), (2, 2, 2, 2), 4),    # depthwise multi-kernel
], ids=["repvgg", "acb", "depthwise"])
def test_merge_parallel_convs(k1, p1, k2, p2, g):
    original = build(parallel(k1, p1, k2, p2, g=g), w1=[4, 4 // g, *k1], b1=[4], w2=[4, 4 // g, *k2])
    model, counts = apply("merge-branches", original)
    assert counts == {"MergeSequentialConvs": 0, "MergeParallelConvs": 1, "AbsorbBranchIntoConv": 0}
    assert ops_of(model) == {"Conv": 1}
    assert_equivalent(original, model)


def test_merge_parallel_convs_negatives():
    shapes = dict(w1=[4, 4, 3, 3], b1=[4], w2=[4, 4, 1, 1])
    cases = [
        (parallel((3, 3), (1, 1, 1, 1), (1, 1), (0, 0, 0, 0), s1=2), "strides/dilations/group differ"),      # 2.
        (parallel((3, 3), (0, 0, 0, 0), (1, 1), (0, 0, 0, 0)), "do not align"),                             # 3.
        (parallel((3, 3), (1, 1, 1, 1), (1, 1), (0, 0, 0, 0), extra="\n    z = Relu(a)"), "other uses"),  # 4.
    ]
    for text, reason in cases:
        if "z = Relu" in text:
            text = text.replace("=> (float[1, 4, 9, 9] y)", "=> (float[1, 4, 9, 9] y, float[1, 4, 9, 9] z)")
        text = text.replace("float[1, 4, 9, 9] y)", "float[1, 4, ?, ?] y)")
        model = build(text, **shapes)
        assert apply("merge-branches", model)[1]["MergeParallelConvs"] == 0
        explained("merge-branches", model, "MergeParallelConvs", reason)
    # 1. A weight that is not constant.
    text = parallel((3, 3), (1, 1, 1, 1), (1, 1), (0, 0, 0, 0)).replace("(float[1, 4, 9, 9] x)", "(float[1, 4, 9, 9] x, float[4, 4, 1, 1] w2)").replace(", float[4, 4, 1, 1] w2>", ">")
    model = build(text, w1=[4, 4, 3, 3], b1=[4])
    assert apply("merge-branches", model)[1]["MergeParallelConvs"] == 0
    explained("merge-branches", model, "MergeParallelConvs", "not constant")


def branch(kind: str, *, stride=1, cout=4, pool="AveragePool<kernel_shape = [3, 3], pads = [1, 1, 1, 1], count_include_pad = 1>"):
    other = {"identity": None, "batchnorm": f"BatchNormalization(x, {BN})", "avgpool": f"{pool}(x)"}[kind]
    line = "y = Add(x, a)" if other is None else f"o = {other}\n    y = Add(o, a)"
    return HEADER + f"""
g (float[1, 4, 8, 8] x) => (float[1, {cout}, ?, ?] y) <float[{cout}, 4, 3, 3] w, float[4] gamma, float[4] beta, float[4] mean, float[4] var> {{
    a = Conv<pads = [1, 1, 1, 1], strides = [{stride}, {stride}]>(x, w)
    {line}
}}"""


@pytest.mark.parametrize("kind", ["identity", "batchnorm", "avgpool"])
def test_absorb_branch(kind):
    original = build(branch(kind), w=[4, 4, 3, 3], **BN_SHAPES(4))
    model, counts = apply("merge-branches", original)
    assert counts == {"MergeSequentialConvs": 0, "MergeParallelConvs": 0, "AbsorbBranchIntoConv": 1}
    assert ops_of(model) == {"Conv": 1}
    assert_equivalent(original, model)


def test_absorb_branch_negatives():
    cases = [
        (branch("identity", stride=2), "does not keep the spatial grid"),                                       # 1.
        (branch("identity", cout=6), "needs equal counts"),                                                     # 2.
        (branch("batchnorm").replace("BatchNormalization(x,", "BatchNormalization<training_mode = 1>(x,"), "training mode"),  # 3.
        (branch("avgpool", pool="AveragePool<kernel_shape = [3, 3], pads = [1, 1, 1, 1]>"), "excludes padding"),  # 4.
        (branch("avgpool", pool="AveragePool<kernel_shape = [3, 3], pads = [1, 1, 1, 1], strides = [2, 2]>"), "strided"),  # 4.
    ]
    for text, reason in cases:
        cout = 6 if "float[6, 4" in text else 4
        model = build(text, w=[cout, 4, 3, 3], **BN_SHAPES(4))
        assert apply("merge-branches", model)[1]["AbsorbBranchIntoConv"] == 0, reason
        explained("merge-branches", model, "AbsorbBranchIntoConv", reason)
    # 5. The Conv output has another reader.
    text = branch("identity").replace("=> (float[1, 4, ?, ?] y)", "=> (float[1, 4, ?, ?] y, float[1, 4, ?, ?] a)")
    model = build(text, w=[4, 4, 3, 3], **BN_SHAPES(4))
    assert apply("merge-branches", model)[1]["AbsorbBranchIntoConv"] == 0
    explained("merge-branches", model, "AbsorbBranchIntoConv", "other uses")


# Golden counts, derived from the architectures (2 blocks + a Conv+BN stem each):
# legacy (BN kept): BN folds = 1 + 2 * convs-with-BN per block; dynamo: torch folds Conv+BN itself.
GOLDEN = {
    ("repvgg", "legacy"): {"FoldBatchNormIntoLinear": 1 + 2 * 2, "MergeParallelConvs": 2 * 1, "AbsorbBranchIntoConv": 2 * 1},
    ("repvgg", "dynamo"): {"MergeParallelConvs": 2 * 1, "AbsorbBranchIntoConv": 2 * 1},
    ("acb", "legacy"): {"FoldBatchNormIntoLinear": 1 + 2 * 3, "MergeParallelConvs": 2 * 2},
    ("acb", "dynamo"): {"MergeParallelConvs": 2 * 2},
    ("mobileone", "legacy"): {"FoldBatchNormIntoLinear": 1 + 2 * 7, "MergeParallelConvs": 2 * 5, "AbsorbBranchIntoConv": 2 * 2},
    ("mobileone", "dynamo"): {"MergeParallelConvs": 2 * 5, "AbsorbBranchIntoConv": 2 * 2},
}
BLOCKS = {"repvgg": convnets.RepVGGBlock, "acb": convnets.ACBlock, "mobileone": convnets.MobileOneBlock}
CONVS_AFTER = {"repvgg": 3, "acb": 3, "mobileone": 5}  # stem + one Conv per block (MobileOne: two)


@pytest.mark.slow
@pytest.mark.parametrize("arch, exporter", sorted(GOLDEN))
def test_reparam_models(arch, exporter, tmp):
    path = convnets.export(convnets.trained(BLOCKS[arch]), tmp / f"{arch}.onnx", exporter)
    result = graphopt.optimize(path, dims={"batch": 2})
    counts = {k: v for k, v in result.report.rewrites().items() if k in {"FoldBatchNormIntoLinear", "MergeParallelConvs", "AbsorbBranchIntoConv"}}
    assert counts == GOLDEN[arch, exporter]
    assert result.report.validation.passed and all(p.status != "rolled-back" for p in result.report.passes)
    assert ops_of(result.model) == {"Conv": CONVS_AFTER[arch], "Relu": CONVS_AFTER[arch], "ReduceMean": 1, "Gemm": 1}
    assert_matches_in_openvino(result.model, graphopt.feeds.make_inputs(result.model, dims={"batch": 2}))  # issue 12


@settings(max_examples=20, deadline=None)
@given(c=st.sampled_from([2, 4, 6]), k=st.sampled_from([1, 3, 5]), small=st.sampled_from([1, 3]),
       depthwise=st.booleans(), seed=st.integers(0, 2**16))
def test_merge_property(c, k, small, depthwise, seed):
    """Random channel counts, kernel sizes and groups: merged == original, second run fires nothing."""
    small = min(small, k)
    g = c if depthwise else 1
    text = parallel((k, k), (k // 2,) * 4, (small, small), (small // 2,) * 4, g=g, c=c)
    original = build(text, seed=seed, w1=[c, c // g, k, k], b1=[c], w2=[c, c // g, small, small])
    model, counts = apply("merge-branches", original)
    assert counts["MergeParallelConvs"] == 1
    assert_equivalent(original, model)
    assert sum(apply("merge-branches", model)[1].values()) == 0


SEQ = HEADER + """
g (float[1, 4, 8, 8] x) => (float[1, 4, ?, ?] y) <float[4, 4, 1, 1] w1, float[4] b1, float[4, 4, 3, 3] w2, float[4] b2> {
    m = Conv(x, w1, b1)
    y = Conv<pads = [0, 0, 0, 0]>(m, w2, b2)
}"""


def test_merge_sequential_convs():
    original = build(SEQ, w1=[4, 4, 1, 1], b1=[4], w2=[4, 4, 3, 3], b2=[4])
    model, counts = apply("merge-branches", original)
    assert counts == {"MergeSequentialConvs": 1, "MergeParallelConvs": 0, "AbsorbBranchIntoConv": 0}
    assert ops_of(model) == {"Conv": 1}
    assert_equivalent(original, model)


def test_merge_sequential_convs_negatives():
    # 2. The kxk conv pads the output of a biased 1x1.
    model = build(SEQ.replace("pads = [0, 0, 0, 0]", "pads = [1, 1, 1, 1]"), w1=[4, 4, 1, 1], b1=[4], w2=[4, 4, 3, 3], b2=[4])
    assert apply("merge-branches", model)[1]["MergeSequentialConvs"] == 0
    explained("merge-branches", model, "MergeSequentialConvs", "zeros there are not the bias")
    # ...which is exact again without the bias.
    text = SEQ.replace("pads = [0, 0, 0, 0]", "pads = [1, 1, 1, 1]").replace("m = Conv(x, w1, b1)", "m = Conv(x, w1)")
    original = build(text, w1=[4, 4, 1, 1], b1=[4], w2=[4, 4, 3, 3], b2=[4])
    model, counts = apply("merge-branches", original)
    assert counts["MergeSequentialConvs"] == 1
    assert_equivalent(original, model)
    # 3. A bottleneck (4 -> 1 -> 4) stays factored.
    text = SEQ.replace("float[4, 4, 1, 1] w1, float[4] b1, float[4, 4, 3, 3] w2", "float[1, 4, 1, 1] w1, float[1] b1, float[4, 1, 3, 3] w2")
    model = build(text, w1=[1, 4, 1, 1], b1=[1], w2=[4, 1, 3, 3], b2=[4])
    assert apply("merge-branches", model)[1]["MergeSequentialConvs"] == 0
    explained("merge-branches", model, "MergeSequentialConvs", "bottleneck")
    # 1. The first conv is strided.
    model = build(SEQ.replace("m = Conv(x, w1, b1)", "m = Conv<strides = [2, 2]>(x, w1, b1)"), w1=[4, 4, 1, 1], b1=[4], w2=[4, 4, 3, 3], b2=[4])
    assert apply("merge-branches", model)[1]["MergeSequentialConvs"] == 0
    explained("merge-branches", model, "MergeSequentialConvs", "not a plain 1x1 conv")
