"""int8 attention products (passes/precision/products.py): where the quantizers go, the quantized
body against its numpy model, the local error the selection uses against onnxruntime, a
negative per precondition, and the step deciding by target."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
import models
from graphopt import calibration, functions, verify
from graphopt.backends import openvino
from graphopt.passes.precision import products
from graphopt.passes.precision.ranges import ActRange
from graphopt.shapes import infer_shapes
from rule_testing import build

pytestmark = pytest.mark.filterwarnings("ignore")
DIMS = {"batch": 4, "seq": 16}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return models.exact_bert(tmp_path_factory.mktemp("products"), DIMS)[1]


def _quantized(model, feeds):
    work = model.clone()
    sites = products.find_attention_sites(work.ir.graph)
    captured = calibration.run_exposed(work, sorted({n for s in sites for n in products.capture_names(s)}), [feeds])[0]
    chosen = [products.choose(s, captured) for s in sites]
    for site, (qkv, p, _) in zip(sites, chosen):
        products.quantize(work.ir.graph, site, qkv, p)
    functions.ensure(work.ir)
    return work, sites, chosen, captured


def test_quantizers_go_where_the_projections_write(bert):
    feeds = graphopt.feeds.make_inputs(bert, dims=DIMS)
    sites = products.find_attention_sites(bert.ir.graph)
    assert len(sites) == 2
    for site in sites:  # past the Reshape / Transpose to the projection (its bias Add, or the merged Split)
        assert all(r.producer().op_type in ("Add", "Split") for r in site.roots), [r.producer().op_type for r in site.roots]
    work, _, chosen, _ = _quantized(bert, feeds)
    ops = [n.op_type for n in work.ir.graph]
    assert ops.count("QuantizeLinear") == 6 and ops.count("QuantizedMaskedAttention") == 2
    assert "MaskedAttention" not in ops
    assert all(e < 0.02 for *_, e in chosen)
    assert verify.min_cosine(verify.run(bert, feeds), verify.run(work, feeds)) > 0.999
    in_ov = openvino.compile(work, precision="f32").run(feeds)
    assert verify.min_cosine(verify.run(work, feeds), in_ov) > 0.9999  # the same int8 function in OpenVINO


def test_the_local_error_is_what_onnxruntime_computes(bert):
    """The selection's error model (numpy) matches the quantized graph's call output in onnxruntime."""
    feeds = graphopt.feeds.make_inputs(bert, dims=DIMS, seed=3)
    work = bert.clone()
    site = products.find_attention_sites(work.ir.graph)[0]  # the first call: its inputs are the float ones
    name = site.node.outputs[0].name
    captured = calibration.run_exposed(work, products.capture_names(site), [feeds])[0]
    qkv, p, err = products.choose(site, captured)
    products.quantize(work.ir.graph, site, qkv, p)
    functions.ensure(work.ir)
    exact = calibration.run_exposed(bert, [name], [feeds])[0][name][:products.MAX_SEQUENCES]
    got = calibration.run_exposed(work, [name], [feeds])[0][name][:products.MAX_SEQUENCES]
    measured = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert measured == pytest.approx(err, rel=1e-3), (measured, err)


BODY = """<ir_version: 10, opset_import: ["" : 21, "graphopt" : 1]>
g (float[2, 3, 5, 4] q, float[2, 3, 4, 6] kt, float[2, 3, 6, 4] v, float[2, 1, 1, 6] bias) => (float[2, 3, 5, 4] y)
    <float ps = {0.002}, uint8 pz = {0}> {
    y = graphopt.QuantizedMaskedAttention<scale = 0.5, q_num_heads = 3, kv_num_heads = 3, head_size = 4, causal = 0,
                                          rope = 0, mask = "additive">(q, kt, v, bias, ps, pz)
}"""


def test_quantized_body_against_its_numpy_model():
    model = build(BODY)
    functions.ensure(model.ir)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in
             (("q", (2, 3, 5, 4)), ("kt", (2, 3, 4, 6)), ("v", (2, 3, 6, 4)), ("bias", (2, 1, 1, 6)))}
    got = verify.run(model, feeds)["y"]
    want, _ = products.reference(feeds["q"], feeds["kt"], feeds["v"], feeds["bias"], 0.5,
                                 ActRange(0.0, 255 * 0.002, "max"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


CALL = """<ir_version: 10, opset_import: ["" : 21, "graphopt" : 1]>
g (float[2, 5, 12] x, float[2, 1, 1, 5] bias) => (float[2, 3, 5, 4] y{extra_out}) <int64[4] heads = {{2, 5, 3, 4}}> {{
    q4 = Reshape(x, heads)
    q = Transpose<perm = [0, 2, 1, 3]>(q4)
    k4 = Reshape({k_source}, heads)
    kt = Transpose<perm = [0, 2, 3, 1]>(k4)
    v4 = Reshape({v_source}, heads)
    v = Transpose<perm = [0, 2, 1, 3]>(v4)
    {extra}
    y = graphopt.MaskedAttention<scale = 0.5, q_num_heads = 3, kv_num_heads = 3, head_size = 4, causal = 0,
                                 rope = 0, mask = "additive">(q, kt, v, bias)
}}"""


def _call(extra="", extra_out="", dtype="float"):
    text = CALL.format(k_source="kx", v_source="vx", extra=extra, extra_out=extra_out)
    text = text.replace("float[2, 5, 12] x,", "float[2, 5, 12] x, float[2, 5, 12] kx, float[2, 5, 12] vx,")
    if dtype != "float":
        text = text.replace("float[", f"{dtype}[")
    model = build(text)
    functions.ensure(model.ir)
    infer_shapes(model.ir)
    return model


def test_attention_site_preconditions():
    roots = [r.name for r in products.find_attention_sites(_call().ir.graph)[0].roots]
    assert roots == ["x", "kx", "vx"]  # walked back through both layout ops of each input
    # 1. A call that is not float32 is no site.
    assert products.find_attention_sites(_call(dtype="float16").ir.graph) == []
    # 2. A layout node whose input has another reader: the quantizer stays after it.
    read_twice = _call(extra="r = Relu(k4)", extra_out=", float[2, 5, 3, 4] r")
    site = products.find_attention_sites(read_twice.ir.graph)[0]
    assert site.roots[1].name == "kt"
    # 2. One value read as two of Q, K, V: the call is left float.
    shared = _call()
    call = next(n for n in shared.ir.graph if n.op_type == "MaskedAttention")
    call.replace_input_with(2, call.inputs[0])  # V = Q
    assert products.find_attention_sites(shared.ir.graph) == []


def test_the_step_quantizes_the_products_only_for_openvino(bert):
    on_ort = graphopt.optimize(bert, passes=["eliminate-dead-code"], precision="int8", fidelity=0.0, dims=DIMS,
                               target="ort-cpu")
    assert on_ort.report.fidelity["attention_products"]["calls"] == 0
    assert "QuantizedMaskedAttention" not in {n.op_type for n in on_ort.model.graph}
    on_cpu = graphopt.optimize(bert, passes=["eliminate-dead-code"], precision="int8", fidelity=0.0, dims=DIMS,
                               target="cpu", use_cache=False)
    fid = on_cpu.report.fidelity
    assert fid["attention_products"]["calls"] == 2
    rows = [e for e in fid["layers"] if e["op"] == "MaskedAttention"]
    assert len(rows) == 2 and all(e["float_ms"] > 0 and e["int8_ms"] > 0 and e["rel_error"] > 0 for e in rows)
    quantized = sum(1 for e in rows if e["precision"] == "int8")
    calls = [n.op_type for n in graphopt.load(graphopt.exporters.to_proto(on_cpu.model)).graph]
    # bound 0: every faster row is kept; the products' rows say whether OpenVINO ran them faster here
    assert quantized == (2 if rows[0]["int8_ms"] < rows[0]["float_ms"] else 0)
    if on_cpu.model.ir.metadata_props.get("graphopt.runtime") == "openvino":  # portable: the body inlined
        assert ("QuantizeLinear" in calls) and "MaskedAttention" not in calls
