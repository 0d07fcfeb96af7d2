"""Mixer latency vs sequence length (issue 6): a Llama-style decoder (random weights, 6 layers,
hidden 512, 8 heads, intermediate 1408, RoPE), batch 1, ORT CPU: the original (canonical
softmax attention) vs every layer swapped to each mixer, and the floor (every attention
sub-layer dropped: projections and MLPs only). One process, interleaved rounds per length;
medians, ratios against the original and the floor, a log-log PNG, and peak RSS per length
(each measured in a fresh subprocess, since a process's peak only grows).

The floor keeps every projection and MLP and does no token mixing at all (each attention op's
output is its V): no attention replacement can be faster. `drop` (a mixer) removes the whole
attention sub-layer, projections included, so it can beat the floor.

    .venv/bin/python benchmarks/mixers.py [--lengths 512,1024,2048,4096,8192] [--rounds 3]
                                          [--mixers linear:elu,linear:relu,...] [--plot out.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import models  # noqa: E402

import graphopt  # noqa: E402
from graphopt.sessions import session_for  # noqa: E402
from graphopt import machine  # noqa: E402
from graphopt import timing  # noqa: E402
from graphopt.passes.mixers import swap_mixers  # noqa: E402

MIXERS = ("linear:elu", "linear:relu", "linear:relu+dwc", "linear:hedgehog", "linear:performer", "window", "hybrid", "pool")


def llama(tmp: Path) -> graphopt.Model:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=1408, max_position_embeddings=16384,
                         attn_implementation="sdpa")
    module = models.LastHidden(LlamaModel(config).eval())
    path = models.export(module, models.token_inputs(config.vocab_size, 2, 16), ["input_ids", "attention_mask"],
                         models.DYNAMIC, tmp / "llama.onnx", "dynamo")
    return graphopt.optimize(path, dims={"batch": 1, "seq": 64}).model


FLOOR = "floor (no mixing)"


def variants(model: graphopt.Model, mixers, say) -> dict[str, graphopt.Model]:
    """Calibrated on generated inputs of 64 tokens (windows are chosen there: what 95% of the
    attention mass covers in this random model); evaluation orders chosen for 4096."""
    out = {"original": model}
    for mixer in (*mixers, "drop"):
        result = swap_mixers(model, mixer, steps=0, dims={"batch": 1, "seq": 64}, seq=4096)
        out[mixer] = result.model
        say(f"{mixer}: " + ", ".join(sorted({e.get("as", "").split(" (")[0].split(" '")[0] for e in result.report["per_layer"]}))
            + (f"; windows {[e['window'] for e in result.report['per_layer']]}" if mixer == "window" else ""))
    out[FLOOR] = floor(model)
    return out


def floor(model: graphopt.Model) -> graphopt.Model:
    """Every attention op replaced by its V: projections and MLPs run, nothing mixes tokens."""
    from graphopt.ir import common_passes
    from graphopt.passes.mixers import attention_nodes

    work = model.clone()
    for node in attention_nodes(work.ir.graph):
        node.outputs[0].replace_all_uses_with(node.inputs[2])
    common_passes.RemoveUnusedNodesPass()(work.ir)
    return work


def feeds(seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(0, 32000, (1, seq), dtype=np.int64), "attention_mask": np.ones((1, seq), np.int64)}


def peak_rss_gib(path: Path, seq: int) -> float:
    """Peak RSS (VmHWM) of a fresh process that loads the model and runs it once at `seq`.
    Not ru_maxrss: Linux carries it across exec, so a child of this large process would
    report the parent's peak."""
    code = (f"import numpy as np, onnxruntime as ort\n"
            f"s = ort.InferenceSession({str(path)!r}, providers=['CPUExecutionProvider'])\n"
            f"rng = np.random.default_rng(0)\n"
            f"f = {{'input_ids': rng.integers(0, 32000, (1, {seq}), dtype=np.int64), 'attention_mask': np.ones((1, {seq}), np.int64)}}\n"
            f"s.run(None, f)\n"
            f"print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def main() -> None:
    print(machine.line(), flush=True)  # the machines differ from day to day: name the CPU
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mixers", default=",".join(MIXERS))
    ap.add_argument("--plot", default=str(Path(__file__).parent / "mixers.png"))
    ap.add_argument("--json")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    console = Console(emoji=False)  # mixer names such as linear:hedgehog are not emoji codes
    lengths = [int(x) for x in args.lengths.split(",")]
    results: dict[str, dict[int, float]] = {}
    memory: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with console.status("exporting and swapping"):
            models_ = variants(llama(tmp), args.mixers.split(","), lambda m: console.print(m, markup=False))
        sessions, paths = {}, {}
        for name, model in models_.items():
            paths[name] = graphopt.save(model, tmp / f"{name.replace(':', '_').split(' ')[0]}.onnx")
            sessions[name] = session_for(str(paths[name]), disabled=())
        for seq in lengths:
            f = feeds(seq)
            with console.status(f"seq {seq}"):
                medians = timing.medians(timing.interleaved({n: (lambda s=s: s.run(f)) for n, s in sessions.items()},
                                                            rounds=args.rounds, warmup=1))
            for name, t in medians.items():
                results.setdefault(name, {})[seq] = t
            console.print(f"seq {seq}: " + ", ".join(f"{n} {t:.3f}s" for n, t in medians.items()), markup=False)
        if not args.no_memory:
            for name in ("original", args.mixers.split(",")[0], FLOOR):
                for seq in lengths:
                    memory.setdefault(name, {})[seq] = peak_rss_gib(paths[name], seq)
    table = Table(title=f"Llama-style 6x512, batch 1, ORT CPU, median of {args.rounds} interleaved rounds (seconds; "
                        "ratio = original / mixer, floor ratio = mixer / floor)", title_justify="left")
    table.add_column("contender")
    for seq in lengths:
        table.add_column(str(seq))
    for name, per_len in results.items():
        cells = []
        for seq in lengths:
            t = per_len[seq]
            cells.append(f"{t:.3f} ({results['original'][seq] / t:.2f}x, {t / results[FLOOR][seq]:.2f} of floor)")
        table.add_row(name, *cells)
    console.print(table)
    for name, per_len in memory.items():
        console.print(f"peak RSS {name}: " + ", ".join(f"{seq}: {gib:.2f} GiB" for seq, gib in per_len.items()), markup=False)
    _plot(results, lengths, args.plot)
    console.print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": results, "peak_rss_gib": memory}, indent=1))


def _plot(results, lengths, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, per_len in results.items():
        style = dict(linestyle="--", color="black", linewidth=2) if name == FLOOR else {}
        ax.plot(lengths, [per_len[s] for s in lengths], marker="o", label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("latency (s), batch 1, ORT CPU")
    ax.set_title("Llama-style 6x512: softmax attention vs token mixers")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
