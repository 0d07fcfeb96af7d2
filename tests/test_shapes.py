"""graphopt's shape-inference merge keeps non-tensor types (onnx_ir 1.1's pass does not)."""

from __future__ import annotations

import onnx.parser

import graphopt
from graphopt import verify
from graphopt.ir import ir
from graphopt.shapes import infer_shapes

import numpy as np


def test_sequence_types_survive_and_tensor_shapes_appear():
    model = graphopt.load(onnx.parser.parse_model("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2, 3] x) => (float[2, 3] y) {
        r = Relu(x)
        s = SequenceConstruct(r, r)
        t = SequenceAt(s, zero)
        y = Identity(t)
    }
    """.replace("g (float[2, 3] x)", "g (float[2, 3] x, int64 zero)")))
    assert infer_shapes(model.ir)
    values = ir.convenience.create_value_mapping(model.graph)
    assert isinstance(values["s"].type, ir.SequenceType)
    assert values["r"].shape == ir.Shape([2, 3]) and values["r"].dtype == ir.DataType.FLOAT
    out = verify.run(model, {"x": np.ones((2, 3), np.float32), "zero": np.array(0, np.int64)})
    np.testing.assert_array_equal(out["y"], np.ones((2, 3), np.float32))
