"""Validation: generated inputs, tolerances, metrics, user inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

import graphopt
from graphopt import feeds, verify

EMBED = """
<ir_version: 10, opset_import: ["" : 21]>
embed (int64[batch, seq] input_ids, int64[batch, seq] attention_mask, int64[batch, seq] position_ids) => (float[batch, seq, 8] y) <float[50, 8] table, float[64, 8] pos> {
    e = Gather(table, input_ids)
    p = Gather(pos, position_ids)
    m = Cast<to = 1>(attention_mask)
    mu = Unsqueeze(m, axes)
    s = Add(e, p)
    y = Mul(s, mu)
}
"""


def embed_model(scale: float = 1.0):
    text = EMBED.replace("<float[50, 8] table, float[64, 8] pos>", "<float[50, 8] table, float[64, 8] pos, int64[1] axes = {-1}>")
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(1)
    proto.graph.initializer.extend([
        onnx.numpy_helper.from_array((rng.standard_normal((50, 8)) * scale).astype(np.float32), "table"),
        onnx.numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float32), "pos"),
    ])
    return graphopt.load(proto)


def test_generated_inputs_respect_ranges_and_dims():
    model = embed_model()
    made = feeds.make_inputs(model, dims={"seq": 20})
    assert made["input_ids"].shape == (1, 20) and made["input_ids"].dtype == np.int64
    assert made["input_ids"].min() >= 0 and made["input_ids"].max() < 50  # bound by the Gather table
    assert (made["attention_mask"] == 1).all()
    np.testing.assert_array_equal(made["position_ids"][0], np.arange(20))
    again = feeds.make_inputs(model, dims={"seq": 20})
    np.testing.assert_array_equal(made["input_ids"], again["input_ids"])  # seeded
    assert not np.array_equal(made["input_ids"], feeds.make_inputs(model, seed=1, dims={"seq": 20})["input_ids"])


def test_identical_models_validate():
    with pytest.raises(graphopt.InputError, match="table of 64 positions"):
        graphopt.validate(embed_model(), embed_model())  # default seq=128 overruns the position table
    result = graphopt.validate(embed_model(), embed_model(), dims={"seq": 64})
    assert result.passed
    out = result.outputs[0]
    assert out.max_abs_error == 0 and out.cosine == pytest.approx(1.0) and (out.rtol, out.atol) == (1e-5, 1e-6)


def test_small_perturbation_fails_fp32_tolerance():
    result = graphopt.validate(embed_model(), embed_model(scale=1.0001), dims={"seq": 32})
    assert not result.passed
    out = result.outputs[0]
    assert 1e-5 < out.max_abs_error < 1e-2 and out.cosine > 0.99999


def test_compare_arrays_metrics():
    ref = np.array([1.0, 2.0, 0.0], np.float32)
    check = verify.compare_arrays("y", ref, ref + np.float32(1e-3))
    assert not check.passed and check.max_abs_error == pytest.approx(1e-3, rel=1e-3)
    assert verify.compare_arrays("y", ref, ref, rtol=0, atol=0).passed
    nan = np.array([np.nan, 1.0], np.float32)
    assert verify.compare_arrays("y", nan, nan.copy()).passed
    assert not verify.compare_arrays("y", nan, np.array([0.0, 1.0], np.float32)).passed
    assert not verify.compare_arrays("y", ref, ref[:2]).passed
    half = ref.astype(np.float16)
    assert verify.compare_arrays("y", half, half + np.float16(5e-4)).passed  # fp16 tolerance is looser


def test_user_inputs_checked(tmp):
    model = embed_model()
    good = feeds.make_inputs(model, dims={"seq": 5})
    np.savez(tmp / "good.npz", **good)
    assert graphopt.validate(model, model, tmp / "good.npz").passed
    bad = dict(good, input_ids=good["input_ids"][:, :3])
    np.savez(tmp / "bad.npz", **bad)
    with pytest.raises(graphopt.InputError, match="dim 'seq'"):
        graphopt.validate(model, model, tmp / "bad.npz")
    wrong_dtype = dict(good, input_ids=good["input_ids"].astype(np.int32))
    with pytest.raises(graphopt.InputError, match="dtype int32"):
        feeds.check_inputs(wrong_dtype, model)
    with pytest.raises(graphopt.InputError, match="missing position_ids"):
        feeds.check_inputs({k: v for k, v in good.items() if k != "position_ids"}, model)


def _big_matmul(tmp, external: bool):
    import onnx.helper as oh
    import onnx.numpy_helper as nh

    w = np.random.default_rng(0).standard_normal((1024, 512)).astype(np.float32)  # 2 MiB: fed by reference
    small = np.ones(512, np.float32)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "W"], ["h"]), oh.make_node("Add", ["h", "b"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", 1, [2, 1024])], [oh.make_tensor_value_info("y", 1, [2, 512])],
                          [nh.from_array(w, "W"), nh.from_array(small, "b")])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    path = tmp / "big.onnx"
    onnx.save(proto, path, save_as_external_data=external, location="big.onnx.data", size_threshold=1024)
    return graphopt.load(path), w


@pytest.mark.parametrize("external", [False, True])
def test_checks_feed_large_weights_by_reference(tmp, external):
    """Issue 16, item 2: a check serializes the graph only; the 2 MiB weight reaches onnxruntime
    as the model's own array (memory-mapped when it is external data), the results are the
    same, and the model is left as it was."""
    from graphopt import exporters

    model, w = _big_matmul(tmp, external)
    x = np.random.default_rng(1).standard_normal((2, 1024)).astype(np.float32)
    before = [v.name for v in model.ir.graph.inputs], sorted(model.ir.graph.initializers)
    tensor = model.ir.graph.initializers["W"].const_value
    with exporters.ort_weightless(model) as (loadable, weights):
        assert set(weights) == {"W"} and isinstance(loadable, bytes) and len(loadable) < 64 * 1024
        if external:  # a view of the memory-mapped file, not a copy
            assert np.shares_memory(weights["W"], tensor.numpy())
        np.testing.assert_array_equal(weights["W"], w)
    assert ([v.name for v in model.ir.graph.inputs], sorted(model.ir.graph.initializers)) == before
    got = verify.run(model, {"x": x})["y"]
    np.testing.assert_allclose(got, x @ w + 1, rtol=1e-5, atol=1e-4)
    assert ([v.name for v in model.ir.graph.inputs], sorted(model.ir.graph.initializers)) == before
