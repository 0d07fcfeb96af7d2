"""The `graphopt` command, as a user runs it: exit codes, messages, files written or not."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from test_load_save import mlp_proto

GRAPHOPT = [str(Path(sys.executable).with_name("graphopt"))]


def graphopt(*args, check_rc=None):
    proc = subprocess.run([*GRAPHOPT, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


@pytest.fixture
def mlp(tmp):
    path = tmp / "mlp.onnx"
    onnx.save(mlp_proto(), path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_inspect_json(mlp):
    info = json.loads(graphopt("inspect", mlp, "--json", check_rc=0).stdout)
    assert {"inputs", "outputs", "op_counts", "num_nodes", "num_params", "opsets"} <= set(info)
    assert info["op_counts"] == {"MatMul": 2, "Relu": 1} and info["num_params"] == 2 * 64 * 64
    assert info["inputs"] == [{"name": "x", "dtype": "float", "shape": ["N", 64]}]


def test_passes_json():
    data = json.loads(graphopt("passes", "--json", check_rc=0).stdout)
    assert {"fold-constants", "cse"} <= {p["name"] for p in data["passes"]}
    assert data["presets"]["exact"][0] == "fold-constants"


def test_optimize_writes_model_and_report(mlp, tmp):
    proc = graphopt("optimize", mlp, "-o", tmp / "out.onnx", "--report", tmp / "r.json", "--dims", "N=3", check_rc=0)
    assert "validation" in proc.stdout
    report = json.loads((tmp / "r.json").read_text())
    assert report["validation"]["passed"] and report["validation"]["inputs"] == {"x": [3, 64]}
    assert json.loads(graphopt("validate", mlp, tmp / "out.onnx", "--json", check_rc=0).stdout)["passed"]


def test_optimize_refuses_to_overwrite_input(mlp):
    before = digest(mlp)
    proc = graphopt("optimize", mlp, "-o", mlp, check_rc=2)
    assert "refusing to overwrite" in proc.stderr and digest(mlp) == before


def test_validate_mismatch_exits_3(mlp, tmp):
    other = tmp / "other.onnx"
    onnx.save(mlp_proto(seed=1), other)
    proc = graphopt("validate", mlp, other, check_rc=3)
    assert "FAIL" in proc.stdout


def test_convert(tmp):
    factory = tmp / "factory.py"
    factory.write_text(
        "import torch\n"
        "def make():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))\n"
        "    return m, (torch.randn(2, 8),), ({0: 'batch'},)\n"
    )
    graphopt("convert", f"{factory}:make", "-o", tmp / "m.onnx", check_rc=0)
    info = json.loads(graphopt("inspect", tmp / "m.onnx", "--json", check_rc=0).stdout)
    assert info["inputs"][0]["shape"] == ["batch", 8]
    proc = graphopt("convert", f"{factory}:missing", "-o", tmp / "n.onnx", check_rc=2)
    assert "no function 'missing'" in proc.stderr and not (tmp / "n.onnx").exists()


# Bad input: exit 2, one line naming the problem, input byte-identical, no output file.

def _truncated(tmp, mlp):
    bad = tmp / "bad.onnx"
    bad.write_bytes(mlp.read_bytes()[: mlp.stat().st_size // 2])
    return bad, "not a readable ONNX model"


def _not_onnx(tmp, mlp):
    bad = tmp / "bad.onnx"
    bad.write_text("this is a text file, not a model\n" * 10)
    return bad, "not a"


def _missing_external_data(tmp, mlp):
    import graphopt as g

    bad = g.save(g.load(mlp), tmp / "ext" / "bad.onnx", external_data=True)
    (tmp / "ext" / "bad.onnx.data").unlink()
    return bad, "missing external data file 'bad.onnx.data'"


def _unknown_domain(tmp, mlp):
    bad = tmp / "bad.onnx"
    proto = onnx.parser.parse_model('<ir_version: 10, opset_import: ["" : 21, "acme" : 1]>\n'
                                    "g (float[2] x) => (float[2] y) { y = acme.Frobnicate(x) }")
    onnx.save(proto, bad)
    return bad, "unsupported operators: acme::Frobnicate"


@pytest.mark.parametrize("make_bad", [_truncated, _not_onnx, _missing_external_data, _unknown_domain])
@pytest.mark.parametrize("command", ["inspect", "optimize"])
def test_bad_model_file(make_bad, command, tmp, mlp):
    bad, message = make_bad(tmp, mlp)
    before = digest(bad)
    out = tmp / "out.onnx"
    args = [command, bad] + (["-o", out, "--report", tmp / "r.json"] if command == "optimize" else [])
    proc = graphopt(*args, check_rc=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error:") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert digest(bad) == before and not out.exists() and not (tmp / "r.json").exists()


def test_inputs_with_wrong_shapes(mlp, tmp):
    np.savez(tmp / "in.npz", x=np.zeros((2, 32), np.float32))
    before = digest(mlp)
    proc = graphopt("optimize", mlp, "-o", tmp / "out.onnx", "--inputs", tmp / "in.npz", check_rc=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'x' has shape [2, 32], the model wants [N, 64]" in lines[0], proc.stderr
    assert digest(mlp) == before and not (tmp / "out.onnx").exists()
    graphopt("validate", mlp, mlp, "--inputs", tmp / "in.npz", check_rc=2)


def test_debug_shows_traceback(tmp):
    proc = graphopt("inspect", tmp / "nope.onnx", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.slow
def test_optimize_exact_preset_on_a_transformers_export(tmp):
    """The acceptance command: `graphopt optimize MODEL -o OUT --preset exact --report R.json`."""
    import models

    module, args, names, dynamic = models.gpt2_with_trained_like_norms()
    src = models.export(module, args, names, dynamic, tmp / "gpt2.onnx", "legacy")
    before = digest(src)
    graphopt("optimize", src, "-o", tmp / "gpt2.opt.onnx", "--preset", "exact", "--report", tmp / "r.json",
             "--dims", "batch=2,seq=16", check_rc=0)
    report = json.loads((tmp / "r.json").read_text())
    fired = {rule: n for p in report["passes"] if p["status"] == "applied" for rule, n in p["rewrites"].items() if n}
    layers = json.loads(graphopt("inspect", src, "--json", check_rc=0).stdout)["attention"]
    assert [(a["heads"], a["kv_heads"], a["head_size"], a["mask"]) for a in layers] == [(4, 4, 8, "additive")] * 2
    assert "attention layers: 2" in graphopt("inspect", tmp / "gpt2.opt.onnx", check_rc=0).stdout
    assert fired["PreLNToPreRMSNorm"] == 5 and fired["FuseGeluTanh"] == 2 and fired["FoldNormAffineIntoLinear"] == 4
    assert report["validation"]["passed"] and digest(src) == before
    assert json.loads(graphopt("validate", src, tmp / "gpt2.opt.onnx", "--dims", "batch=2,seq=16", "--json", check_rc=0).stdout)["passed"]


def test_optimize_mixers_reports_the_fitting_cost_per_layer(tmp):
    """Issue 17, item 5: a mixer's calibration cost per layer is in the report (the CLI shows
    a bar per layer while it fits); the output projections' correction says what it did."""
    import models

    module, args, names, dynamic = models.gpt2_with_trained_like_norms()
    src = models.export(module, args, names, dynamic, tmp / "gpt2.onnx", "legacy")
    graphopt("optimize", src, "-o", tmp / "mixed.onnx", "--preset", "mixers", "--mixer", "linear:hedgehog",
             "--calib-steps", "20", "--report", tmp / "r.json", "--dims", "batch=2,seq=16", check_rc=0)
    fid = json.loads((tmp / "r.json").read_text())["fidelity"]
    assert all(e["fit_seconds"] > 0 for e in fid["per_layer"]) and len(fid["per_layer"]) == 2
    assert fid["calibration"]["fit_seconds_per_layer"] > 0 and fid["calibration"]["steps"] == 20
    assert len(fid["correction"]["layers"]) == 2 and isinstance(fid["correction"]["kept"], bool)


def test_optimize_for_ort_cpu_and_bench(tmp):
    """`optimize --target ort-cpu` records the measured lowering; `bench --json` times every contender."""
    import os

    import models

    env_cache = tmp / "cache"
    module, args, names, dynamic = models.transformer("bert", "sdpa")
    src = models.export(module, args, names, dynamic, tmp / "bert.onnx", "dynamo")
    os.environ["GRAPHOPT_CACHE_DIR"] = str(env_cache)
    try:
        graphopt("optimize", src, "-o", tmp / "bert.ort.onnx", "--target", "ort-cpu", "--report", tmp / "r.json",
                 "--dims", "batch=1,seq=16", check_rc=0)
        lowering = json.loads((tmp / "r.json").read_text())["lowering"]
        assert lowering["target"] == "ort-cpu" and set(lowering["choices"]) == {"attention", "skip-norm"}
        assert list(env_cache.glob("ort-select/*.json"))  # the choice is cached
        proc = graphopt("bench", src, "--optimized", tmp / "bert.ort.onnx", "--rounds", "2", "--dims", "batch=1,seq=16",
                        "--against", "original,onnxscript", "--json", check_rc=0)
        result = json.loads(proc.stdout)
        assert [c["name"] for c in result["contenders"]] == ["graphopt", "original", "onnxscript"]
        assert result["contenders"][0]["max_abs_error"] < 1e-4
        assert graphopt("bench", src, "--against", "tvm", check_rc=2).stderr.startswith("graphopt: error: unknown contender")
    finally:
        os.environ.pop("GRAPHOPT_CACHE_DIR", None)


def test_optimize_int8_prints_every_layer_and_writes_the_report(mlp, tmp):
    """The int8 step through the CLI: the per-layer table renders, the report has the layers."""
    proc = graphopt("optimize", mlp, "-o", tmp / "q.onnx", "--precision", "int8", "--fidelity", "0.0",
                    "--report", tmp / "r.json", "--dims", "N=256", check_rc=0)
    assert "fidelity: int8 on" in proc.stdout and "WARNING: no calibration data" in proc.stdout
    report = json.loads((tmp / "r.json").read_text())
    layers = report["fidelity"]["layers"]
    assert [e["op"] for e in layers] == ["MatMul", "MatMul"]
    assert all(e["precision"] in ("int8", "float32") and e["float_ms"] > 0 for e in layers)


def test_optimize_bf16_writes_a_bf16_graph_and_says_what_stayed_float32(mlp, tmp):
    proc = graphopt("optimize", mlp, "-o", tmp / "h.onnx", "--precision", "bf16", "--fidelity", "0.99",
                    "--dims", "N=256", check_rc=0)
    assert "bf16 graph:" in proc.stdout and "onnxruntime's CPU provider has no bf16 kernels" in proc.stdout
    saved = onnx.load(tmp / "h.onnx")
    assert {i.type.tensor_type.elem_type for i in saved.graph.input} == {onnx.TensorProto.FLOAT}
    assert onnx.TensorProto.BFLOAT16 in {t.data_type for t in saved.graph.initializer}


def test_help_says_what_graphopt_does_and_every_command_ends_with_an_example(capsys):
    from graphopt import cli

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    head = text.split("positional arguments")[0]
    assert "rewrites a neural network" in head and "fastest runtime on this machine" in head
    examples = [line.strip() for line in text.split("examples:")[1].splitlines() if line.strip()]
    assert len(examples) == 3 and all(line.startswith("graphopt optimize ") for line in examples)
    assert any("--target cpu" in e for e in examples) and any("--fidelity" in e for e in examples) \
        and any("--mixer" in e for e in examples)
    for command in cli.EXAMPLES:
        if command is None:
            continue
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        tail = capsys.readouterr().out.rstrip().splitlines()[-1].strip()
        assert tail == f"graphopt {command}" or tail.startswith(f"graphopt {command} "), (command, tail)
    # the examples use flags the commands have
    parser = cli._parser()
    for lines in cli.EXAMPLES.values():
        for line in lines:
            parser.parse_args(line.split("#")[0].split()[1:])
