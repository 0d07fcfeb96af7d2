"""Large models: `graphopt optimize --preset exact`, with every step checked and without
checks, against onnxruntime's transformers optimizer and onnxsim, on the same files in one
run: wall time and peak RSS of each tool's whole process.

Two sizes, random weights, built once into --dir (reused by later runs):
  bert-large  BERT-large shape (24 layers, hidden 1024, 16 heads), legacy torch export, one
              1.24 GiB file (no external data: what that exporter writes below 2 GB)
  llama-1b    a Llama-style decoder of about 1B parameters (20 layers, hidden 2048, GQA 32/8
              heads, SwiGLU 5632, vocab 32000), legacy torch export, weights as external data
              in one file

Each contender runs in its own child process; its peak RSS is the kernel's maximum resident
set of that process (wait4's ru_maxrss), so it counts the weights' memory-mapped pages as
well as anonymous memory. A watchdog kills a child whose RSS passes --rss-cap-gb (the
machine must survive an anchor that needs more than it has) and the row says so. The
constant is the peak RSS of `graphopt optimize` on a model with almost no weights (the
interpreter, onnxruntime, onnx_ir, onnxscript). graphopt's outputs are checked by its own
final validation; every output is also compared with the input by `graphopt validate`.

    .venv/bin/python benchmarks/big_model.py [--models bert-large,llama-1b] [--dir /tmp/graphopt-big]
        [--onnxsim-python /tmp/onnxsim-venv/bin/python] [--rss-cap-gb 20]

onnxsim is an anchor, not a dependency: install it in its own environment
(python3 -m venv /tmp/onnxsim-venv && /tmp/onnxsim-venv/bin/pip install onnxsim==0.8.1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parents[1]))
from graphopt import machine  # noqa: E402

GIB = 2**30

# name: (builder source, ORT transformers optimizer arguments, generated input dims)
BUILD = {
    "bert-large": textwrap.dedent("""
        import torch, transformers
        cfg = transformers.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                      intermediate_size=4096, attn_implementation="eager")
        torch.manual_seed(0)
        bert = transformers.BertModel(cfg).eval()

        class Hidden(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask):
                return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        model = Hidden()
        ids = torch.randint(0, cfg.vocab_size, (2, 128)); mask = torch.ones(2, 128, dtype=torch.int64)
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                "last_hidden_state": {0: "batch", 1: "seq"}}
        torch.onnx.export(model, (ids, mask), OUT, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    """),
    "llama-1b": textwrap.dedent("""
        import os, torch, transformers, onnx
        cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                       max_position_embeddings=2048, attn_implementation="eager", use_cache=False)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, cfg.vocab_size, (2, 64)); mask = torch.ones(2, 64, dtype=torch.int64)
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                "logits": {0: "batch", 1: "seq"}}
        raw = os.path.join(os.path.dirname(OUT), "export", "model.onnx")
        os.makedirs(os.path.dirname(raw), exist_ok=True)
        torch.onnx.export(model, (ids, mask), raw, input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)
        del model
        proto = onnx.load(raw)  # the exporter writes a file per tensor: gather them into one
        onnx.save_model(proto, OUT, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(OUT) + ".data", size_threshold=1024)
    """),
}
ORT_ARGS = {"bert-large": ["--model_type", "bert", "--num_heads", "16", "--hidden_size", "1024"],
            "llama-1b": ["--model_type", "gpt2", "--num_heads", "32", "--hidden_size", "2048"]}
DIMS = {"bert-large": "batch=1,seq=128", "llama-1b": "batch=1,seq=64"}

TINY = textwrap.dedent("""
    import onnx, onnx.helper as h
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    g = h.make_graph([h.make_node("Relu", ["x"], ["r"]), h.make_node("Identity", ["r"], ["y"])], "tiny", [x], [y])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), OUT)
""")


def build(name: str, directory: Path) -> Path:
    """The model file, built in a child process on first use."""
    out = directory / name / "model.onnx"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    source = BUILD[name] if name in BUILD else TINY
    print(f"building {name} ...", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"OUT = {str(out)!r}\n" + source], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(out.parent / "export", ignore_errors=True)
    print(f"  built in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def model_bytes(path: Path) -> int:
    """The model's file plus its external data files (everything in its folder but outputs)."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file() and p.name.startswith("model.onnx"))


@dataclasses.dataclass
class Run:
    wall_s: float
    peak_rss: int  # bytes
    returncode: int
    killed: bool
    output: str  # stdout and stderr together


def measure(cmd: list[str], cap: int, env: dict | None = None) -> Run:
    """Run `cmd`; its wall time and peak RSS (wait4), killed if its RSS passes `cap`."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    killed = threading.Event()
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
    reader.start()

    def watch() -> None:
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                if p.memory_info().rss > cap:
                    killed.set()
                    proc.kill()
                    return
                time.sleep(0.1)
        except psutil.NoSuchProcess:
            return

    threading.Thread(target=watch, daemon=True).start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    text = (output[0] if output else b"").decode(errors="replace")
    return Run(wall, usage.ru_maxrss * 1024, proc.returncode, killed.is_set(), text)


def contenders(name: str, model: Path, out: Path, onnxsim_python: str | None) -> dict[str, list[str]]:
    go = [sys.executable, "-m", "graphopt.cli", "optimize", str(model), "--preset", "exact", "--dims", DIMS[name]]
    external = ["--external-data"] if (model.parent / "model.onnx.data").exists() else []
    runs = {
        "graphopt, every step checked": go + ["-o", str(out / "checked.onnx"), "--report", str(out / "checked.json")] + external,
        "graphopt, no checks": go + ["-o", str(out / "unchecked.onnx"), "--no-validate",
                                     "--report", str(out / "unchecked.json")] + external,
        "onnxruntime transformers optimizer": [sys.executable, "-m", "onnxruntime.transformers.optimizer",
                                               "--input", str(model), "--output", str(out / "ort.onnx"),
                                               *ORT_ARGS[name], *(["--use_external_data_format"] if external else [])],
    }
    if onnxsim_python:
        runs["onnxsim"] = [onnxsim_python, "-m", "onnxsim", str(model), str(out / "onnxsim.onnx"),
                           *(["--save-as-external-data"] if external else [])]
    return runs


OUTPUTS = {"graphopt, every step checked": "checked.onnx", "graphopt, no checks": "unchecked.onnx",
           "onnxruntime transformers optimizer": "ort.onnx", "onnxsim": "onnxsim.onnx"}


def validate(name: str, model: Path, candidate: Path, cap: int) -> str:
    if not candidate.exists():
        return "no output"
    run = measure([sys.executable, "-m", "graphopt.cli", "validate", str(model), str(candidate),
                   "--dims", DIMS[name], "--json"], cap)
    try:
        result = json.loads(run.output[run.output.index("{"):])
    except ValueError:
        return f"validate failed: {run.output.strip().splitlines()[-1] if run.output.strip() else run.returncode}"
    worst = max((o["max_rel_error"] for o in result["outputs"]), default=0.0)
    return f"{'pass' if result['passed'] else 'FAIL'} (max rel {worst:.1e})"


def report_summary(path: Path) -> str:
    if not path.exists():
        return ""
    report = json.loads(path.read_text())
    steps = report.get("steps", [])
    rewrites = sum(sum(s.get("rewrites", {}).values()) for s in steps)
    checked = sum(1 for s in steps if "passed" in (s.get("check") or {}))
    slow = sorted(((s.get("seconds", 0.0), s["name"]) for s in steps), reverse=True)[:3]
    return (f"{rewrites} rewrites, {checked} checks; slowest passes: "
            + ", ".join(f"{n} {t:.1f} s" for t, n in slow))


def main() -> int:
    print(machine.line(), flush=True)  # the machines differ from day to day: name the CPU
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert-large,llama-1b")
    parser.add_argument("--dir", default="/tmp/graphopt-big")
    parser.add_argument("--onnxsim-python", default="/tmp/onnxsim-venv/bin/python")
    parser.add_argument("--rss-cap-gb", type=float, default=0.85 * psutil.virtual_memory().total / GIB)
    parser.add_argument("--only", help="comma-separated contender names to run (default: all)")
    args = parser.parse_args()
    directory, cap = Path(args.dir), int(args.rss_cap_gb * GIB)
    onnxsim_python = args.onnxsim_python if Path(args.onnxsim_python).exists() else None
    if onnxsim_python is None:
        print(f"onnxsim skipped: {args.onnxsim_python} not found (see the module docstring)")

    tiny = build("tiny", directory)
    base = measure([sys.executable, "-m", "graphopt.cli", "optimize", str(tiny), "--preset", "exact",
                    "-o", str(tiny.parent / "out.onnx")], cap)
    constant = base.peak_rss
    print(f"constant: graphopt optimize on a weightless model peaks at {constant / GIB:.2f} GiB\n")

    table = {}
    for name in args.models.split(","):
        model = build(name, directory)
        size = model_bytes(model)
        out = directory / name / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        print(f"## {name}: {size / GIB:.2f} GiB "
              f"({'external data' if (model.parent / 'model.onnx.data').exists() else 'one file'})", flush=True)
        rows = {}
        for label, cmd in contenders(name, model, out, onnxsim_python).items():
            if args.only and label not in args.only.split(","):
                continue
            os.sync()
            run = measure(cmd, cap)
            status = ("killed: RSS above the cap" if run.killed else
                      "ok" if run.returncode == 0 else f"exit {run.returncode}: "
                      + (run.output.strip().splitlines() or [""])[-1][:160])
            extra = report_summary(out / OUTPUTS[label].replace(".onnx", ".json")) if label.startswith("graphopt") else ""
            rows[label] = (run, status)
            over = (run.peak_rss - constant) / size
            print(f"  {label:36s} {run.wall_s:7.1f} s  {run.peak_rss / GIB:6.2f} GiB = {run.peak_rss / size:.2f}x "
                  f"({over:.2f}x + constant)  {status}", flush=True)
            if extra:
                print(f"      {extra}", flush=True)
        for label, (run, status) in rows.items():
            if status == "ok":
                print(f"  outputs of {label}: {validate(name, model, out / OUTPUTS[label], cap)}", flush=True)
        table[name] = (size, rows)
        for f in out.iterdir():  # the outputs are large: keep only the reports
            if not f.name.endswith(".json"):
                f.unlink()

    print("\n| model | size | tool | wall | peak RSS | x size | (peak - constant) / size |")
    print("|---|---|---|---|---|---|---|")
    for name, (size, rows) in table.items():
        for label, (run, status) in rows.items():
            note = "" if status == "ok" else f" ({status})"
            print(f"| {name} | {size / GIB:.2f} GiB | {label}{note} | {run.wall_s:.1f} s | {run.peak_rss / GIB:.2f} GiB "
                  f"| {run.peak_rss / size:.2f}x | {(run.peak_rss - constant) / size:.2f}x |")
    print(f"\nconstant: {constant / GIB:.2f} GiB")
    names = list(table)
    for a, b in zip(names, names[1:]):
        (sa, ra), (sb, rb) = table[a], table[b]
        print(f"scaling {a} -> {b}: size x{sb / sa:.2f}")
        for label in ra:
            if label in rb and ra[label][1] == rb[label][1] == "ok":
                print(f"  {label}: wall x{rb[label][0].wall_s / ra[label][0].wall_s:.2f}, "
                      f"peak RSS x{rb[label][0].peak_rss / ra[label][0].peak_rss:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
