"""Issue 29 item 3 (in part): one fidelity budget for the plan (`approx=`, `--approx`): the
families it allows, the requests they make, each approximate step's share, and the whole plan's
end-to-end output within the bound against the model before the first approximate step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import graphopt
from graphopt import budget, fidelity, verify
from graphopt.errors import InputError
from rule_testing import build, header

D, K, ROWS = 256, 1024, 128


def _mlp():
    """Wide enough that int8 is faster than float here, with redundant neurons to prune."""
    model = build(header(17) + f"""
        g (float[N, {D}] x) => (float[N, {D}] y) <float[{D}, {K}] w1, float[{K}] b1, float[{K}, {D}] w2> {{
            up = MatMul(x, w1)
            pre = Add(up, b1)
            h = Relu(pre)
            y = MatMul(h, w2)
        }}""", w1=[D, K], b1=[K], w2=[K, D])
    for name, axis in (("w1", 1), ("b1", 0)):  # half the neurons duplicate the other half: prunable
        value = model.ir.graph.initializers[name]
        array = np.moveaxis(value.const_value.numpy().copy(), axis, 0)
        array[K // 2:] = array[: K // 2]
        value.const_value = graphopt.ir.ir.tensor(np.ascontiguousarray(np.moveaxis(array, 0, axis)), name=name)
    return model


def _batches(n=24):
    return [{"x": np.random.default_rng(i).standard_normal((ROWS, D)).astype(np.float32)} for i in range(n)]


def test_families_and_the_requests_they_make():
    assert budget.families("auto") == ("prune", "int8") and budget.families("int8,prune") == ("int8", "prune")
    assert budget.families(None) == ()
    with pytest.raises(InputError, match="unknown approximate family bf17"):
        budget.families("prune,bf17")
    assert budget.requests(("prune", "int8"), {"mixer": None, "precision": None}) == {"prune": "all", "mixer": None, "precision": "int8"}
    assert budget.requests(("prune",), {"prune": "ffn"})["prune"] == "ffn"  # what the user named wins
    assert list(budget.requests(("int8", "prune"), {"mixer": None, "precision": None})) == ["prune", "mixer", "precision"]
    with pytest.raises(InputError, match="--approx mixers needs the mixer"):
        budget.requests(("mixers",), {"mixer": None})
    with pytest.raises(InputError, match="--approx int8 with --precision bf16"):
        budget.requests(("int8",), {"precision": "bf16"})
    assert budget.requests(("bf16",), {"precision": None})["precision"] == "bf16"
    assert budget.requests(("int8", "bf16"), {"precision": None}, target="cpu")["precision"] == "auto"
    with pytest.raises(InputError, match="bf16 beside int8 is OpenVINO's measured precision hint"):
        budget.requests(("int8", "bf16"), {"precision": None}, target="ort-cpu")
    with pytest.raises(InputError, match="--approx bf16 with --precision int8"):
        budget.requests(("bf16",), {"precision": "int8"})
    shares = budget.Budget(0.99, 2)
    assert [round(shares.share(i), 6) for i in range(2)] == [0.995, 0.99]


def test_the_whole_plan_stays_within_one_bound():
    model, calib = _mlp(), _batches()  # 12 x 128 fit rows: more than the 1024 neurons
    result = graphopt.optimize(model, passes=["eliminate-dead-code"], approx="prune,int8", fidelity=0.99, calib=calib)
    steps = [s for s in result.report.steps if s.kind == "approximate"]
    assert [s.name for s in steps] == ["prune", "quantize-int8"]
    assert [round(s.check["bound"], 6) for s in steps] == [0.995, 0.99]  # each step's share
    assert all(s.check["passed"] and s.check["min_cosine"] >= s.check["bound"] for s in steps)
    assert steps[0].rewrites.get("PruneFfnNeurons", 0) >= K // 4
    # measured here, against the model the plan started from, on the held-out half
    held = calib[len(calib) // 2:]
    e2e = fidelity.end_to_end([verify.run(model, f) for f in held], result.model, held)
    assert fidelity.worst_mean_cosine(e2e) >= 0.99
    assert abs(fidelity.worst_mean_cosine(e2e) - steps[-1].check["min_cosine"]) < 1e-4  # what the last step reported
    notes = " ".join(result.report.notes)
    assert "one fidelity budget 0.99 for prune, int8" in notes and "its part of the error" in notes


def test_bf16_takes_its_share_after_pruning(tmp_path):
    model, calib = _mlp(), _batches()
    result = graphopt.optimize(model, passes=["eliminate-dead-code"], approx="prune,bf16", fidelity=0.99, calib=calib)
    steps = [s for s in result.report.steps if s.kind == "approximate"]
    assert [s.name for s in steps] == ["prune", "convert-precision"]
    assert [round(s.check["bound"], 6) for s in steps] == [0.995, 0.99]
    assert all(s.check["passed"] for s in steps) and steps[1].status == "applied"
    assert any(v.dtype == graphopt.ir.ir.DataType.BFLOAT16 for v in result.model.ir.graph.initializers.values())
    # the bf16 graph runs in OpenVINO (onnxruntime has no bf16 MatMul on CPU): its output, from
    # the model the plan started from, is within the bound on held-out rows
    from graphopt.backends import openvino

    path = graphopt.save(result.model, tmp_path / "bf16.onnx")
    compiled = openvino.compile(path, precision="f32")  # the graph's own types decide
    held = calib[len(calib) // 2:]
    cosines = [verify.min_cosine(verify.run(model, f), compiled.run(f)) for f in held]
    assert min(cosines) >= 0.99


def test_cli_approx(tmp_path):
    model = _mlp()
    path = graphopt.save(model, tmp_path / "m.onnx")
    graphopt.exporters.write_npz({"x": np.concatenate([b["x"] for b in _batches()])}, tmp_path / "calib.npz")
    cli = str(Path(sys.executable).with_name("graphopt"))
    done = subprocess.run([cli, "optimize", str(path), "-o", str(tmp_path / "out.onnx"), "--passes", "eliminate-dead-code",
                           "--approx", "prune", "--fidelity", "0.99", "--calib", str(tmp_path / "calib.npz")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "one fidelity budget 0.99 for prune" in " ".join(done.stdout.split())
    bad = subprocess.run([cli, "optimize", str(path), "-o", str(tmp_path / "x.onnx"), "--approx", "prune,bf17"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown approximate family bf17" in bad.stderr and not (tmp_path / "x.onnx").exists()
