"""Inputs that fit (issue 27, item 2): -1 and unnamed dims are free, sizes by input:axis, the
search for sizes and branch selectors the model runs at, and a clear stop (exit 2, nothing
written) when none is found, unless unchecked output is allowed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest

import graphopt
from graphopt import cli, feeds, fitting, verify

F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
pytestmark = pytest.mark.filterwarnings("ignore")


def _model(nodes, inputs, outputs, inits=()) -> graphopt.Model:
    proto = oh.make_model(oh.make_graph(nodes, "g", inputs, outputs, initializer=list(inits)),
                          opset_imports=[oh.make_opsetid("", 18)])
    onnx.checker.check_model(proto, full_check=True)
    return graphopt.load(proto)


def _reshape_model(target: list[int], width="w") -> graphopt.Model:
    """x [1, width] -> Reshape(x, target) -> Relu: runs only when `target` divides the width."""
    return _model([oh.make_node("Reshape", ["x", "shape"], ["r"], name="r"), oh.make_node("Relu", ["r"], ["y"])],
                  [oh.make_tensor_value_info("x", F, [1, width])], [oh.make_tensor_value_info("y", F, ["a", "b"])],
                  [nh.from_array(np.array(target, np.int64), "shape")])


def paddle_like_model() -> graphopt.Model:
    """PaddleOCR's direction classifier's input form: [-1, 3, ?, ?] (a batch declared -1, '?' dims)."""
    x = oh.make_tensor_value_info("x", F, [-1, 3, "?", "?"])
    w = nh.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    return _model([oh.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], [x],
                  [oh.make_tensor_value_info("y", F, [-1, 4, "?", "?"])], [w])


def test_negative_and_question_mark_dims_are_free():
    model = paddle_like_model()
    assert set(feeds.free_dims(model)) == {"x:0", "x:2", "x:3"}  # each its own: '?' is no shared name
    made = feeds.make_inputs(model)
    assert made["x"].shape == (1, 3, 128, 128)
    assert feeds.make_inputs(model, dims={"x:0": 2, "x:2": 48, "x:3": 192})["x"].shape == (2, 3, 48, 192)
    feeds.check_inputs({"x": np.zeros((1, 3, 48, 192), np.float32)}, model)  # -1 takes any size
    result = graphopt.optimize(model, preset="exact", inputs={"x": np.zeros((1, 3, 48, 192), np.float32)})
    assert result.passed and result.report.validation is not None


def test_a_reshape_target_from_the_model_is_tried():
    model = _reshape_model([-1, 48])  # 128 does not divide by 48; 48 (read from the target) does
    with pytest.raises(graphopt.errors.GraphoptError):
        verify.run(model, feeds.make_inputs(model))
    found = fitting.fit(model, verify.run)
    assert found.dims == {"w": 48} and found.trials == 2
    assert found.outputs["y"].shape == (1, 48)
    assert "found after 2 tries: w=48" in found.describe(0)


def test_the_users_dims_are_never_changed():
    model = _reshape_model([-1, 48])
    with pytest.raises(fitting.NoFittingInputs, match="w"):
        fitting.fit(model, verify.run, dims={"w": 100}, max_trials=20)
    assert fitting.fit(model, verify.run, dims={"x:1": 96}).feeds["x"].shape == (1, 96)


def selector_model() -> graphopt.Model:
    """If sr == 16000 the then branch runs; the else branch's Reshape fits no generated input."""
    def branch(name, target):
        shape = oh.make_node("Constant", [], [f"{name}_shape"], value=nh.from_array(np.array(target, np.int64)))
        return oh.make_graph([shape, oh.make_node("Reshape", ["x", f"{name}_shape"], [f"{name}_out"], name=f"{name}_reshape")],
                             name, [], [oh.make_tensor_value_info(f"{name}_out", F, ["a", "b"])])
    rate = nh.from_array(np.array(16000, np.int64), "rate")
    return _model([oh.make_node("Equal", ["sr", "rate"], ["is_16k"]),
                   oh.make_node("If", ["is_16k"], ["y"], then_branch=branch("then", [-1, 64]),
                                else_branch=branch("else", [-1, 1000003]))],
                  [oh.make_tensor_value_info("x", F, [1, "n"]), oh.make_tensor_value_info("sr", I64, [])],
                  [oh.make_tensor_value_info("y", F, ["a", "b"])], [rate])


def test_a_scalar_compared_with_constants_is_tried_at_those_values():
    model = selector_model()
    found = fitting.fit(model, verify.run)
    assert found.values == {"sr": 16000} and int(found.feeds["sr"]) == 16000
    result = graphopt.optimize(model, preset="exact")
    assert result.passed and result.report.validation is not None


def test_no_fitting_input_names_the_node_and_stops(tmp_path, capsys):
    model = _reshape_model([-1, 1000003])  # no generated width divides by it
    with pytest.raises(fitting.NoFittingInputs) as info:
        fitting.fit(model, verify.run, max_trials=30)
    message = str(info.value)
    assert "node 'r' (Reshape) refused them" in message and "--allow-unchecked" in message and "--dims" in message
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    graphopt.save(model, path)
    assert cli.main(["optimize", str(path), "-o", str(out), "--preset", "exact"]) == 2
    assert not out.exists()
    assert "node 'r' (Reshape)" in capsys.readouterr().err


def test_allow_unchecked_writes_a_model_that_loads_and_says_so(tmp_path, capsys):
    model = _reshape_model([-1, 1000003])
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    graphopt.save(model, path)
    assert cli.main(["optimize", str(path), "-o", str(out), "--preset", "exact", "--allow-unchecked"]) == 0
    assert verify.load_problem(graphopt.load(out)) is None
    assert "not checked numerically (--allow-unchecked)" in capsys.readouterr().out


def test_given_inputs_the_model_does_not_run_on_stop(tmp_path):
    model = _reshape_model([-1, 48])
    with pytest.raises(graphopt.errors.InputError, match="does not run on these inputs"):
        graphopt.optimize(model, inputs={"x": np.zeros((1, 50), np.float32)})
    result = graphopt.optimize(model, inputs={"x": np.zeros((1, 50), np.float32)}, allow_unchecked=True)
    assert result.report.validation is None and any("--allow-unchecked" in n for n in result.report.notes)
