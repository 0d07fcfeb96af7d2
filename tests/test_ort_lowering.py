"""ORT lowerings of the canonical ops, the measured selection and `graphopt bench`.

Exact rewrite counts and ORT equivalence per lowering on real exports (BERT: packed Q/K/V;
Llama: RoPE and grouped-query heads), a negative test per precondition, the selection's
cache, and the bench contenders. Timings are not asserted (benchmarks/ measures them).
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

import graphopt
import models
from graphopt.backends.ort import select as ort_select
from graphopt.errors import BackendError
from graphopt.model import DISABLED_KEY
from rule_testing import apply, assert_equivalent, assert_explained, build, header

pytestmark = pytest.mark.filterwarnings("ignore")
DIMS = {"batch": 2, "seq": 16}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The exact preset's output on tiny BERT and Llama (dynamo, SDPA): canonical attention ops."""
    tmp = tmp_path_factory.mktemp("lowering")
    out = {}
    for arch in ("bert", "llama"):
        module, args, names, dynamic = models.transformer(arch, "sdpa")
        path = models.export(module, args, names, dynamic, tmp / f"{arch}.onnx", "dynamo")
        out[arch] = graphopt.optimize(path, dims=DIMS).model
    return out


def _ops(model, domain=None):
    return [n.op_type for n in model.graph if domain is None or n.domain == domain]


@pytest.mark.parametrize("arch, name, rule, expected", [
    ("bert", "lower-attention-mha", "LowerAttentionMHA", 2),
    ("bert", "lower-attention-packed", "LowerAttentionPacked", 2),
    ("bert", "lower-attention-onnx", "LowerAttentionONNX", 2),
    ("bert", "lower-skip-norm", "SkipNorm", 4),
    ("llama", "lower-attention-mha", "LowerAttentionMHA", 2),
    ("llama", "lower-attention-onnx", "LowerAttentionONNX", 2),
    ("llama", "lower-skip-norm", "SkipNorm", 4),
    ("bert", "lower-norm-input-sum", "NormInputAsSum", 5),  # the embeddings sum too (broadcast: SkipNorm refuses it)
    ("llama", "lower-norm-input-sum", "NormInputAsSum", 4),
])
def test_lowering_counts_and_equivalence(exported, arch, name, rule, expected):
    model = exported[arch]
    work, counts = apply(name, model)
    assert counts == {rule: expected}
    assert_equivalent(model, work, dims=DIMS)
    assert not [n for n in work.graph if n.domain == "graphopt" and "Attention" in n.op_type] or "norm" in name


def test_norm_input_sum_stays_plain_in_a_default_session(exported, tmp):
    """The Sum form is what makes the plain candidate need no session option: a default
    session fuses Add + norm into Skip*LayerNormalization, and leaves Sum + norm alone."""
    import onnx

    def fused(model):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp / "opt.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(graphopt.exporters.to_proto(model).SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}

    skip = {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}
    assert skip & fused(exported["bert"])  # (Llama's inlined RMSNorm bodies are not fused to begin with)
    for arch in ("bert", "llama"):
        work, _ = apply("lower-norm-input-sum", exported[arch])
        assert not skip & fused(work)


def test_norm_input_sum_leaves_adds_that_feed_no_norm():
    model = build(header(17) + """
        g (float[2, 4, 8] a, float[2, 4, 8] b) => (float[2, 4, 8] y) {
            y = Add(a, b)
        }""")
    assert apply("lower-norm-input-sum", model)[1] == {"NormInputAsSum": 0}


def test_onnx_attention_takes_grouped_kv_heads_before_the_repeat(exported):
    work, _ = apply("lower-attention-onnx", exported["llama"])
    attention = [n for n in work.graph if n.op_type == "Attention" and n.domain == ""]
    assert len(attention) == 2 and work.ir.opset_imports[""] == 23
    assert all(n.inputs[1].shape[1] == 2 and n.inputs[0].shape[1] == 4 for n in attention)  # 2 kv heads, 4 query heads


def test_packed_refuses_rotated_queries(exported):
    model = exported["llama"]
    assert apply("lower-attention-packed", model)[1] == {"LowerAttentionPacked": 0}
    assert_explained("lower-attention-packed", model, "LowerAttentionPacked", "is not a head split")


def _canonical_text(opset: int, heads: int, extra: str = "") -> str:
    return header(opset, ', "graphopt" : 1') + f"""
agraph (float[2,4,8,16] q, float[2,4,16,8] kt, float[2,4,8,16] v) => (float[2,4,8,16] y) {{
    {extra}
    y = graphopt.Attention<scale: float = 0.25, q_num_heads: int = {heads}, kv_num_heads: int = {heads}, head_size: int = 16,
                           causal: int = 0, rope: int = 0, mask: string = "none">(q, kt, v)
}}"""


def test_mha_refuses_unknown_heads():
    model = build(_canonical_text(18, 0))
    assert apply("lower-attention-mha", model)[1] == {"LowerAttentionMHA": 0}
    assert_explained("lower-attention-mha", model, "LowerAttentionMHA", "head count or head size is unknown")


def test_mha_on_a_hand_written_canonical_op():
    model = build(_canonical_text(18, 4))
    work, counts = apply("lower-attention-mha", model)
    assert counts == {"LowerAttentionMHA": 1}
    assert_equivalent(model, work)


def test_onnx_attention_refuses_reduce_ops_with_axes_attributes():
    text = _canonical_text(17, 4).replace("=> (float[2,4,8,16] y)", "=> (float[2,4,8,16] y, float[2,4,8,1] r)").replace(
        "    y = graphopt", "    r = ReduceMean<axes = [-1]>(q)\n    y = graphopt")
    model = build(text)
    assert apply("lower-attention-onnx", model)[1] == {"LowerAttentionONNX": 0}
    assert_explained("lower-attention-onnx", model, "LowerAttentionONNX", "would change ReduceMean")


def test_skip_norm_refuses_broadcast_residuals():
    text = header(18) + """
agraph (float[2,8,16] a, float[16] b) => (float[2,8,16] y, float[2,8,16] s) {
    s = Add(a, b)
    y = LayerNormalization<axis = -1>(s, g, beta)
}"""
    model = build(text, g=(16,), beta=(16,))
    assert apply("lower-skip-norm", model)[1] == {"SkipNorm": 0}
    assert_explained("lower-skip-norm", model, "SkipNorm", "are not known to share one rank-3 shape")


def test_read_shapes_from_inputs():
    text = header(18) + """
agraph (float[batch,seq,16] x) => (float[batch,seq,4,4] y) {
    r = Relu(x)
    s = Shape<end = 2>(r)
    four = Constant<value = int64[2] {4, 4}>()
    target = Concat<axis = 0>(s, four)
    y = Reshape(r, target)
}"""
    model = build(text)
    work, counts = apply("read-shapes-from-inputs", model)
    assert counts == {"ReadShapeFromInput": 1}
    assert all(n.inputs[0].name == "x" for n in work.graph if n.op_type == "Shape")
    assert_equivalent(model, work, dims={"batch": 2, "seq": 3})


def test_read_shapes_refuses_dims_no_input_declares():
    text = header(18) + """
agraph (float[batch,16] x) => (int64[1] s) {
    n = NonZero(x)
    s = Shape<start = 1>(n)
}"""
    assert apply("read-shapes-from-inputs", build(text))[1] == {"ReadShapeFromInput": 0}


def test_measured_selection_is_cached(exported, tmp, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp))
    model = exported["bert"].ir
    feeds = graphopt.feeds.make_inputs(exported["bert"], dims=DIMS)
    first = ort_select.select(model, feeds, "ort-cpu", rounds=2)
    assert set(first.choices) == {"attention", "skip-norm"} and not first.cached
    assert set(first.timings_ms["attention"]) == {"decomposed", "contrib-mha", "contrib-attention", "onnx-attention"}
    assert set(first.timings_ms["skip-norm"]) == {"plain", "contrib-skip-norm"}
    assert json.loads(open(first.cache_file).read())["choices"] == first.choices
    second = ort_select.select(model, feeds, "ort-cpu", rounds=2)
    assert second.cached and second.choices == first.choices


def test_optimize_for_ort_cpu_records_the_choice_and_validates(exported, tmp, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp))
    result = graphopt.optimize(exported["llama"], dims=DIMS, target="ort-cpu")
    assert result.report.validation.passed, result.report.validation.to_dict()
    lowering = result.report.to_dict()["lowering"]
    assert lowering["target"] == "ort-cpu" and set(lowering["choices"]) == {"attention", "skip-norm"}
    assert "lower-attention-packed" in " ".join(lowering["skipped"]) or "contrib-attention" in " ".join(lowering["skipped"])
    disabled = result.model.ir.metadata_props.get(DISABLED_KEY, "")
    assert disabled == ",".join(ort_select.Selection(**{**lowering_fields(lowering)}).disabled)


def lowering_fields(lowering):
    return {k: lowering[k] for k in ("target", "provider", "choices", "timings_ms", "skipped")}


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_target_without_cuda_is_an_actionable_error():
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        ort_select.provider_for("ort-cuda")


def test_bench_runs_every_contender(tmp, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp))
    module, args, names, dynamic = models.transformer("bert", "eager")
    path = models.export(module, args, names, dynamic, tmp / "bert.onnx", "legacy")
    result = graphopt.bench(path, dims=DIMS, rounds=2)
    by_name = {c.name: c for c in result.contenders}
    assert list(by_name) == ["graphopt", "original", "ort-optimizer", "onnxscript"]
    for c in by_name.values():
        assert (c.median_ms is not None) != (c.error is not None), c
    assert by_name["graphopt"].max_abs_error < 1e-4 and by_name["original"].speedup == 1.0
    assert np.isfinite(result.to_dict()["contenders"][0]["median_ms"])


def test_ort_target_is_never_slower_than_the_input_as_given(exported, tmp, monkeypatch):
    """The lowered model is timed against the plan's input in default sessions; the faster is kept
    (a rewrite that ORT runs slower than the raw export must not be shipped)."""
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp))
    source = exported["bert"]
    result = graphopt.optimize(source, passes=["cse"], dims=DIMS, target="ort-cpu")
    versus = result.report.lowering["vs_input"]
    assert versus["lowered_ms"] > 0 and versus["input_ms"] > 0
    assert versus["kept"] == ("input as given" if versus["input_ms"] < versus["lowered_ms"] else "lowered")
    step = result.report.steps[-1]
    if versus["kept"] == "input as given":
        assert step.rewrites == {"KeepInputAsGiven": 1} and "faster" in step.note
        assert [n.op_type for n in result.model.graph] == [n.op_type for n in source.graph]
    assert result.report.validation.passed
