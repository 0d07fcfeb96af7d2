"""bf16 / fp16 graph conversion (issue 13, item 5): float32 inputs and outputs, the accumulating
ops named and kept in float32, the file correct where it runs (OpenVINO for bf16, onnxruntime
and OpenVINO for fp16), the rounding emulation agreeing with a real bf16 run, `--target cpu`
measuring the hint against the converted graph, and the requests it refuses."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
import models
from graphopt import ops, verify
from graphopt.errors import InputError
from graphopt.ir import ir
from graphopt.passes.precision import half
from rule_testing import build, header

pytestmark = pytest.mark.filterwarnings("ignore")
DIMS = {"batch": 2, "seq": 16}
LOW = {"bf16": ir.DataType.BFLOAT16, "fp16": ir.DataType.FLOAT16}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    module, args, names, dynamic = models.transformer("bert", "eager")
    path = models.export(module, args, names, dynamic, tmp_path_factory.mktemp("h") / "bert.onnx", "legacy")
    return graphopt.optimize(path, dims=DIMS, portable=True).model


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_conversion_types(bert, precision):
    converted, info = half.convert(bert, precision)
    graph = converted.ir.graph
    assert [v.dtype for v in graph.inputs] == [v.dtype for v in bert.ir.graph.inputs]
    assert [(v.name, v.dtype) for v in graph.outputs] == [(v.name, v.dtype) for v in bert.ir.graph.outputs]
    matmuls = [n for n in graph if n.op_type == "MatMul"]
    assert matmuls and all(v.dtype == LOW[precision] for n in matmuls for v in (*n.inputs, *n.outputs))
    kept = [n for n in graph if ops.OpId("", n.op_type) in ops.KEEP_FLOAT32]
    assert {n.op_type for n in kept} >= {"LayerNormalization", "Softmax"}
    assert all(v.dtype != LOW[precision] for n in kept for v in (*n.inputs, *n.outputs) if v is not None)
    assert info["kept_float32"]["LayerNormalization"] == sum(n.op_type == "LayerNormalization" for n in kept)
    assert not any(v.const_value is not None and v.dtype == ir.DataType.FLOAT and all(
        half.runs_low(r) for r, _ in v.uses()) and list(v.uses()) for v in graph.initializers.values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_file_runs_and_the_emulation_measures_it(bert, precision, tmp):
    from graphopt.backends import openvino

    converted, _ = half.convert(bert, precision)
    emulated, _ = half.convert(bert, precision, emulate=True)
    path = graphopt.save(converted, tmp / f"{precision}.onnx")
    feeds = graphopt.feeds.make_inputs(bert, dims=DIMS, seed=5)
    reference = verify.run(bert, feeds)
    in_ov = openvino.compile(path, precision="f32").run(feeds)  # the graph's own types decide
    estimate = verify.run(emulated, feeds)
    assert 0.999 < verify.min_cosine(reference, in_ov) < 1.0 or precision == "fp16"  # OpenVINO runs f16 graphs in f32 here
    moved = max(float(np.abs(reference[k] - estimate[k]).max()) for k in reference)
    assert verify.min_cosine(reference, estimate) > 0.999 and moved > 1e-4  # 16-bit storage moves the output, a little
    if precision == "bf16" and openvino.supports("bf16"):
        assert verify.min_cosine(in_ov, estimate) > 0.9999  # the emulation is the arithmetic OpenVINO ran
    if precision == "fp16":
        assert verify.min_cosine(reference, verify.run(graphopt.load(path), feeds)) > 0.9999  # onnxruntime loads it


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_optimize_converts_under_the_bound(bert, precision):
    result = graphopt.optimize(bert, passes=["eliminate-dead-code"], precision=precision, fidelity=0.999, dims=DIMS)
    (step,) = [s for s in result.report.steps if s.kind == "approximate"]
    assert step.name == "convert-precision" and step.check["passed"] and step.rewrites["ConvertTo16Bit"] > 10
    assert any(v.dtype == LOW[precision] for n in result.model.graph for v in n.outputs)
    if precision == "fp16":
        return  # its cosine rounds to 1 on this model: no bound is out of its reach
    strict = graphopt.optimize(bert, passes=["eliminate-dead-code"], precision=precision, fidelity=0.99999999, dims=DIMS)
    (step,) = [s for s in strict.report.steps if s.kind == "approximate"]
    assert not step.rewrites and "stays float32" in step.fidelity["note"]
    assert all(v.dtype != LOW[precision] for n in strict.model.graph for v in n.outputs)


def test_target_cpu_measures_the_hint_and_the_graph(bert):
    from graphopt.backends import openvino

    if not openvino.supports("bf16"):
        pytest.skip("OpenVINO reports no bf16 on this CPU")
    feeds = graphopt.feeds.make_inputs(bert, dims=DIMS, seed=1)
    result = graphopt.optimize(bert, passes=["eliminate-dead-code"], precision="bf16", fidelity=0.99, target="cpu",
                               inputs=feeds, use_cache=False)
    lowering = result.report.steps[-1]
    candidates = lowering.measurements["candidates"]
    assert {"openvino-bf16", "openvino-bf16-graph"} <= set(candidates)
    assert all("median_ms" in candidates[k] for k in ("openvino-bf16", "openvino-bf16-graph"))
    graph = lowering.measurements["chosen"] == "openvino-bf16-graph"
    assert any(v.dtype == LOW["bf16"] for n in result.model.graph for v in n.outputs) == graph
    if graph:
        assert lowering.check["measured_in"] == "openvino" and lowering.check["min_cosine"] >= 0.99


def test_refusals():
    loop = build(header(17) + """
        g (float[4] x, bool c) => (float[4] y) {
            y = If(c) <then_branch = t () => (float[4] a) { a = Relu(x) },
                        else_branch = e () => (float[4] b) { b = Neg(x) }>
        }""")
    with pytest.raises(InputError, match="control flow"):
        half.convert(loop, "bf16")
    plain = build(header(17) + "g (float[4, 8] x) => (float[4, 8] y) <float[8, 8] w> { y = MatMul(x, w) }", w=[8, 8])
    with pytest.raises(InputError, match="ort-cpu"):
        graphopt.optimize(plain, passes=["eliminate-dead-code"], precision="bf16", target="ort-cpu")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tvm_runs_the_converted_graph(bert, precision):
    pytest.importorskip("tvm", reason="the tvm extra is not installed")
    from graphopt.backends import tvm as tvm_backend

    converted, _ = half.convert(bert, precision)
    emulated, _ = half.convert(bert, precision, emulate=True)
    feeds = graphopt.feeds.make_inputs(bert, dims=DIMS, seed=6)
    compiled = tvm_backend.compile(converted, shapes={k: v.shape for k, v in feeds.items()})
    got = tvm_backend.prepare(compiled).run(feeds)
    assert all(v.dtype == np.float32 for v in got.values())  # float32 outputs, 16-bit inside
    assert verify.min_cosine(verify.run(emulated, feeds), got) > 0.9999
    assert verify.min_cosine(verify.run(bert, feeds), got) > 0.999
