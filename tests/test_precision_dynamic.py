"""Issue 29 item 1: dynamic-activation int8 (DynamicQuantizeLinear + MatMulInteger, the form
onnxruntime's quantize_dynamic writes) as a per-layer candidate beside static QDQ on onnxruntime
targets: correct in onnxruntime against a numpy model of the arithmetic, fused into
onnxruntime's integer kernels, chosen by gain per error, not offered where OpenVINO runs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphopt
from graphopt import calibration, verify
from graphopt.errors import InputError
from graphopt.passes.precision import dynamic
from graphopt.passes.precision.ranges import quantize_weight
from graphopt.passes.precision.sites import find_sites
from graphopt.passes.precision.step import prefers_dynamic
from rule_testing import build, header

pytestmark = pytest.mark.filterwarnings("ignore")
K, N = 256, 512


def _model():
    return build(header(17) + f"""
        g (float[64, {K}] x) => (float[64, {N}] y) <float[{K}, {N}] w> {{
            y = MatMul(x, w)
        }}""", w=[K, N])


def _reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear's arithmetic (float32 scale, round half to even), int8 weights per column."""
    lo, hi = np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0))
    scale = np.float32((hi - lo) / np.float32(255))
    zero = np.float32(np.clip(np.rint(-lo / scale), 0, 255))
    xq = np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.int64)
    wq, ws = quantize_weight(w, 1)
    acc = (xq - int(zero)) @ wq.astype(np.int64)
    return acc.astype(np.float32) * (scale * ws)


def _fused(model) -> set[str]:
    options = ort.SessionOptions()
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "o.onnx")
        ort.InferenceSession(graphopt.exporters.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}


def test_the_dynamic_form_computes_dynamic_quantize_linear_arithmetic_and_fuses():
    model = _model()
    (site,) = find_sites(model.ir.graph)
    assert dynamic.applies(site)
    w = site.w
    dynamic.quantize(model.ir.graph, site)
    assert sorted(n.op_type for n in model.ir.graph) == sorted(["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul"])
    assert verify.load_problem(model) is None and model.ir.graph.outputs[0].name == "y"
    x = np.random.default_rng(3).standard_normal((64, K)).astype(np.float32) * 2 + 0.5
    got = verify.run(model, {"x": x})["y"]
    np.testing.assert_allclose(got, _reference(x, w), rtol=1e-5, atol=1e-5)
    assert {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"} & _fused(model)  # onnxruntime's integer kernel
    # and it is close to float, with an error the local model predicts
    exact = x @ w
    err = float(np.linalg.norm(got - exact) / np.linalg.norm(exact))
    assert err < 0.02 and abs(err - dynamic.local_error(calibration.Rows.of([x]), w, rows=64)) < 0.2 * err


def test_the_form_with_the_higher_gain_per_error_is_taken():
    row = {"float_ms": 10.0, "int8_ms": 4.0, "rel_error": 0.02}
    assert prefers_dynamic(row, 3.0, 0.02)  # faster at the same error
    assert prefers_dynamic(row, 4.0, 0.01)  # as fast, half the error
    assert not prefers_dynamic(row, 3.0, 0.04)  # 7 ms / 0.04 < 6 ms / 0.02
    assert not prefers_dynamic(row, 11.0, 0.001)  # slower than float: never
    assert prefers_dynamic({"float_ms": 10.0, "int8_ms": None, "rel_error": 0.02}, 6.0, 0.05)  # the static form was not timed


@pytest.mark.parametrize("target", ["ort-cpu", "cpu"])
def test_the_step_offers_the_dynamic_form_on_onnxruntime_only(target):
    model = _model()
    calib = [graphopt.feeds.make_inputs(model, seed=i) for i in range(8)]
    result = graphopt.optimize(model, passes=["eliminate-dead-code"], precision="int8", fidelity=0.99, target=target,
                               calib=calib, inputs=graphopt.feeds.make_inputs(model, seed=20))
    (row,) = result.report.fidelity["layers"]
    if target == "cpu":  # OpenVINO runs static QDQ: not offered
        assert row["form"] == "static" and "dynamic_int8_ms" not in row
        return
    assert row["dynamic_int8_ms"] > 0 and row["dynamic_rel_error"] > 0 and row["static_int8_ms"] > 0
    static_row = {"float_ms": row["float_ms"], "int8_ms": row["static_int8_ms"], "rel_error": row["static_rel_error"]}
    assert row["form"] == ("dynamic" if prefers_dynamic(static_row, row["dynamic_int8_ms"], row["dynamic_rel_error"]) else "static")
    feeds = graphopt.feeds.make_inputs(model, seed=99)
    assert verify.min_cosine(verify.run(model, feeds), verify.run(result.model, feeds)) > 0.99


def test_int8_form_refuses_dynamic_where_it_cannot_run():
    """--int8-form dynamic under --target cpu (OpenVINO runs static QDQ) is refused with the reason;
    an unknown form is refused before anything runs."""
    model = _model()
    calib = [graphopt.feeds.make_inputs(model, seed=i) for i in range(4)]
    with pytest.raises(InputError, match="int8-form dynamic needs an onnxruntime target"):
        graphopt.optimize(model, passes=["eliminate-dead-code"], precision="int8", calib=calib, target="cpu",
                          int8_form="dynamic")
    with pytest.raises(InputError, match="unknown int8_form 'fast'"):
        graphopt.optimize(model, passes=["eliminate-dead-code"], precision="int8", calib=calib, int8_form="fast")
