"""TVM backend: compile real exports for llvm, run them, validate against onnxruntime;
artifacts, the CLI, MetaSchedule tuning with a fresh then a reused database, and CUDA
code generation (compile only: this machine has no GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import graphopt
import models
from graphopt.errors import InputError

tvm = pytest.importorskip("tvm", reason="the tvm extra is not installed")
from graphopt.backends import tvm as tvm_backend  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
GRAPHOPT = str(Path(sys.executable).with_name("graphopt"))


def _check(model, feeds, compiled=None):
    compiled = compiled or tvm_backend.compile(model, shapes={k: v.shape for k, v in feeds.items()})
    got = tvm_backend.prepare(compiled).run(feeds)
    want = graphopt.verify.run(model, feeds)
    for name, ref in want.items():
        check = graphopt.verify.compare_arrays(name, ref, got[name], rtol=1e-5, atol=1e-5)
        assert check.passed, check
    return compiled


@pytest.mark.parametrize("arch, attn", [("bert", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"), ("vit", "sdpa")])
def test_compile_and_run_transformers(arch, attn, tmp):
    module, args, names, dynamic = models.transformer(arch, attn)
    path = models.export(module, args, names, dynamic, tmp / "m.onnx", "dynamo")
    dims = {"batch": 2, "seq": 16}
    model = graphopt.optimize(path, dims=dims).model  # canonical attention and norm functions inside
    _check(model, graphopt.feeds.make_inputs(model, dims=dims))


def test_compile_and_run_legacy_swin(tmp):
    """Swin's shifted windows pad the feature map with pads computed at run time; once they
    fold, the Pad's output shape is static and its Shape must fold too (specialize iterates):
    before that, TVM's frontend stopped at "Reshape expects the input tensor to have known shape"."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.SwinConfig(embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=7, image_size=56,
                                     patch_size=4, attn_implementation="eager")
    module = models.PixelLastHidden(transformers.SwinModel(config).eval())
    path = models.export(module, (torch.randn(2, 3, 56, 56),), ["pixel_values"], {"pixel_values": {0: "batch"}},
                         tmp / "swin.onnx", "legacy")
    model = graphopt.optimize(path, dims={"batch": 1}).model
    _check(model, graphopt.feeds.make_inputs(model, dims={"batch": 1}))


def test_compile_and_run_repvgg_convnet(tmp):
    import convnets

    net = convnets.trained(convnets.RepVGGBlock)
    path = convnets.export(net, tmp / "repvgg.onnx", "dynamo")
    model = graphopt.optimize(path, dims={"batch": 1}).model
    _check(model, graphopt.feeds.make_inputs(model, dims={"batch": 1}))


def test_symbolic_dims_need_shapes(tmp):
    module, args, names, dynamic = models.transformer("bert", "sdpa")
    path = models.export(module, args, names, dynamic, tmp / "m.onnx", "dynamo")
    with pytest.raises(InputError, match="--shapes input_ids="):
        tvm_backend.compile(graphopt.load(path))


def test_cli_compile_and_run_artifact(tmp):
    module, args, names, dynamic = models.transformer("gpt2", "sdpa")
    path = models.export(module, args, names, dynamic, tmp / "m.onnx", "dynamo")
    feeds = graphopt.feeds.make_inputs(graphopt.load(path), dims={"batch": 1, "seq": 8})
    np.savez(tmp / "in.npz", **feeds)
    subprocess.run([GRAPHOPT, "compile", path, "-o", tmp / "m.so", "--target", "llvm",
                    "--shapes", "input_ids=1x8,attention_mask=1x8"], check=True, capture_output=True)
    signature = json.loads((tmp / "m.so.json").read_text())
    assert [i["shape"] for i in signature["inputs"]] == [[1, 8], [1, 8]]
    subprocess.run([GRAPHOPT, "run", tmp / "m.so", "--inputs", tmp / "in.npz", "-o", tmp / "tvm.npz"], check=True, capture_output=True)
    subprocess.run([GRAPHOPT, "run", path, "--inputs", tmp / "in.npz", "-o", tmp / "ort.npz"], check=True, capture_output=True)
    with np.load(tmp / "tvm.npz") as a, np.load(tmp / "ort.npz") as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5)
    wrong = subprocess.run([GRAPHOPT, "run", tmp / "m.so", "--inputs", tmp / "bad.npz", "-o", tmp / "x.npz"],
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and not (tmp / "x.npz").exists()
    bench = subprocess.run([GRAPHOPT, "bench", path, "--tvm", tmp / "m.so", "--against", "original", "--rounds", "2",
                            "--dims", "batch=1,seq=8", "--json"], check=True, capture_output=True, text=True)
    contenders = {c["name"]: c for c in json.loads(bench.stdout)["contenders"]}
    assert list(contenders) == ["graphopt", "tvm", "original"]
    assert contenders["tvm"]["median_ms"] > 0 and contenders["tvm"]["max_abs_error"] < 1e-4


def _mlp():
    import onnx.parser

    from rule_testing import build

    text = """<ir_version: 10, opset_import: ["" : 18]>
agraph (float[4,64] x) => (float[4,64] y) {
    h = MatMul(x, w)
    b = Add(h, bias)
    y = Relu(b)
}"""
    assert onnx.parser.parse_model(text)
    return build(text, w=(64, 64), bias=(64,))


def test_tuning_database_is_written_then_reused(tmp):
    model = _mlp()
    feeds = graphopt.feeds.make_inputs(model)
    seen = []
    first = tvm_backend.compile(model, tuning_db=tmp / "db", trials=4, progress=lambda n, total: seen.append(n))
    records = (tmp / "db" / "database_tuning_record.json").read_text().splitlines()
    assert first.tuned and len(records) >= 1 and seen and seen[-1] == len(records)
    _check(model, feeds, first)
    second = tvm_backend.compile(model, tuning_db=tmp / "db", trials=0)  # reuse only: nothing measured
    assert second.tuned and second.tuning_records == first.tuning_records
    assert (tmp / "db" / "database_tuning_record.json").read_text().splitlines() == records
    _check(model, feeds, second)


def test_cuda_code_generation_and_export(tmp):
    module, args, names, dynamic = models.transformer("bert", "sdpa")
    path = models.export(module, args, names, dynamic, tmp / "m.onnx", "dynamo")
    model = graphopt.optimize(path, dims={"batch": 1, "seq": 16}).model
    compiled = tvm_backend.compile(model, target="cuda", arch="sm_90", shapes={"input_ids": (1, 16), "attention_mask": (1, 16)})
    artifact = tvm_backend.export(compiled, tmp / "bert_cuda.so")
    assert artifact.stat().st_size > 0 and "cuda" in json.loads((tmp / "bert_cuda.so.json").read_text())["target"]


def test_tuning_through_an_rpc_tracker_on_loopback(tmp):
    """MetaSchedule measures on a device registered with TVM's RPC tracker (here: this machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                                "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    try:
        _wait_for_port(port, tracker)
        server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}",
                                   "--key", "loopback", "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_device(port, "loopback")
        model = _mlp()
        runner = tvm_backend.rpc_runner("127.0.0.1", port, "loopback")
        compiled = tvm_backend.compile(model, tuning_db=tmp / "db", trials=2, runner=runner)
        assert compiled.tuned and compiled.tuning_records >= 1
        records = [json.loads(line) for line in (tmp / "db" / "database_tuning_record.json").read_text().splitlines()]
        assert all(max(r[1][1]) < 1.0 for r in records), "a trial was not measured through the tracker"
        _check(model, graphopt.feeds.make_inputs(model), compiled)
    finally:
        for proc in (server, tracker):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)


def _wait_for_port(port: int, process, timeout: float = 60.0) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the RPC tracker exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError("the RPC tracker did not start listening")


def _wait_for_device(port: int, key: str, timeout: float = 60.0) -> None:
    import time

    from tvm import rpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        summary = rpc.connect_tracker("127.0.0.1", port).summary()
        if any(q.get("free", 0) for k, q in summary.get("queue_info", {}).items() if k == key):
            return
        time.sleep(0.5)
    raise AssertionError(f"no '{key}' device registered with the tracker")
