"""Issue 28 item 2: each step declares its options once (graphopt.steps.StepOption, registered
with the step); optimize's keywords, Options and the CLI flags come from the registrations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx.parser
import pytest

import graphopt
from graphopt import registry
from graphopt.errors import InputError
from graphopt.steps import ApproximateStep, Approximation, Options, StepOption

GRAPHOPT = str(Path(sys.executable).with_name("graphopt"))
TINY = '<ir_version: 10, opset_import: ["" : 17]>\ng (float[2, 3] x) => (float[2, 3] y) { y = Relu(x) }'


class _Recorder(ApproximateStep):
    """A do-nothing approximate step that records the option value it was built with."""

    name = "record-option"
    seen: list = []

    def __init__(self, value, options: Options) -> None:
        super().__init__(options)
        _Recorder.seen.append((value, options.strength))

    def approximate(self, model):
        return Approximation(model.clone(), {}, {"end_to_end": {}})


@pytest.fixture
def recorder():
    registry.register_approximate("recorder", _Recorder, choices=lambda: ("on",),
                                  options=(StepOption("strength", 3, "how hard the recorder records", parse=int),))
    _Recorder.seen.clear()
    yield _Recorder
    registry._APPROXIMATE.pop("recorder"), registry._CHOICES.pop("recorder"), registry._STEP_OPTIONS.pop("strength")


def test_a_registered_option_is_an_optimize_keyword_with_its_default(recorder):
    model = graphopt.load(onnx.parser.parse_model(TINY))
    plan_options = Options(step={"strength": 7})
    assert plan_options.strength == 7 and Options().strength == 3
    from graphopt import plan

    plan.build([], approximate={"recorder": "on"}, options=plan_options)
    assert recorder.seen == [("on", 7)]
    with pytest.raises(InputError, match="unknown option.*strenght"):
        graphopt.optimize(model, strenght=1)


def test_the_mixer_declares_its_options_and_the_cli_shows_them():
    declared = {option.name: (owner, option) for owner, option in registry.step_options()}
    assert {"layers", "calib_steps", "max_window", "features"} <= set(declared)
    assert declared["features"][0] == "--mixer" and declared["features"][1].default == 1
    assert Options().calib_steps == 300 and Options(step={"max_window": 8}).max_window == 8
    with pytest.raises(AttributeError, match="no registered step declares"):
        Options().no_such_option
    shown = subprocess.run([GRAPHOPT, "optimize", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--layers", "--calib-steps", "--max-window", "--features"):
        assert flag in shown
    assert "(--mixer; default: 300)" in " ".join(shown.split())


def test_a_bad_layers_value_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "m.onnx"
    graphopt.save(graphopt.load(onnx.parser.parse_model(TINY)), path)
    done = subprocess.run([GRAPHOPT, "optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--layers", "x,y"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--layers wants all, auto or indices" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o.onnx").exists()
