"""The function library: bodies built from Python (onnxscript's builder) for every opset form,
and onnxruntime's own fusions still matching the inlined float32 bodies."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

from graphopt import functions
from graphopt.ir import ir


def _model(opset: int, dtype=onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    nodes = [oh.make_node("Gelu", ["x"], ["g"], domain=functions.DOMAIN),
             oh.make_node("GeluTanh", ["x"], ["t"], domain=functions.DOMAIN),
             oh.make_node("RMSNormalization", ["x", "s", "e"], ["r"], domain=functions.DOMAIN),
             *[oh.make_node("MatMul", [a, "w"], [f"y_{a}"]) for a in ("g", "t", "r")]]
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", dtype, [2, 8, 16])],
                          [oh.make_tensor_value_info(f"y_{a}", dtype, None) for a in ("g", "t", "r")],
                          [onnx.numpy_helper.from_array(np.ones(16, np_dtype), "s"),
                           onnx.numpy_helper.from_array(np.array(1e-6, np_dtype), "e"),
                           onnx.numpy_helper.from_array(np.full((16, 16), 0.1, np_dtype), "w")])
    model = ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=10))
    assert functions.ensure(model) == ["Gelu", "GeluTanh", "RMSNormalization"]
    return ir.serde.serialize_model(model)


@pytest.mark.parametrize("opset", [17, 18])
def test_ort_fuses_the_inlined_float32_bodies(opset):
    """FastGelu/Gelu and SimplifiedLayerNormalization still match the inlined bodies: the
    float32 bodies use plain constants (no CastLike) and the Pow form of RMSNorm."""
    options = ort.SessionOptions()
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(_model(opset).SerializeToString(), options, providers=["CPUExecutionProvider"])
        fused = sorted(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert fused == ["FastGelu", "Gelu", "MatMul", "MatMul", "MatMul", "SimplifiedLayerNormalization"]


CORE = ("Attention", "MaskedAttention", "LayerNormalization", "RMSNormalization", "Gelu", "GeluTanh", "SiLU")


@pytest.mark.parametrize("opset", [13, 15, 17, 18, 21])
def test_every_body_builds_and_checks_at_every_opset(opset):
    """Per-opset variants come from branches in the builder (reduction axes as attribute or
    input); each body is a valid FunctionProto with its declared inputs and outputs. The core
    ops build from opset 13; the mixers from 15 (they slice shapes with Shape's start/end)."""
    functions.families.load()
    for name, fd in sorted(functions.LIBRARY.items()):
        if opset < 15 and name not in CORE:
            continue
        proto = ir.serde.serialize_function(functions.build(name, opset, plain=False))
        assert [i for i in proto.input] == list(fd.inputs) and list(proto.output) == list(fd.outputs), name
        reduce_axes = [n for n in proto.node if n.op_type in ("ReduceMean", "ReduceMax", "ReduceMin")]
        assert all((len(n.input) == 2) == (opset >= 18) for n in reduce_axes), name
        model = oh.make_model(oh.make_graph([], "g", [], []), functions=[proto], ir_version=10,
                              opset_imports=[oh.make_opsetid("", opset), oh.make_opsetid(functions.DOMAIN, 1)])
        onnx.checker.check_model(model)


def test_non_float32_calls_cast_their_constants():
    """fp16 calls: every constant is CastLike'd to x (and no body is fused into an fp32 kernel)."""
    proto = ir.serde.serialize_function(functions.build("Gelu", 18, plain=False))
    assert [n.op_type for n in proto.node].count("CastLike") == 3
    plain = ir.serde.serialize_function(functions.build("Gelu", 18, plain=True))
    assert "CastLike" not in [n.op_type for n in plain.node]
