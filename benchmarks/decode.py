"""Decoding cost vs position (issue 6): one new token through a Llama-style decoder (random
weights, 6 layers, hidden 512, 8 heads, intermediate 1408, RoPE) with its KV cache (the
original: softmax attention over P past tokens) vs every layer swapped to causal linear
attention carrying a fixed-size state instead of the cache (passes/mixers/state.py). Batch 1,
ORT CPU, one process, interleaved rounds per position; medians, and the bytes each step reads
and writes as cache or state.

    .venv/bin/python benchmarks/decode.py [--positions 512,2048,8192] [--rounds 20]
                                          [--mixers linear:relu,linear:hedgehog] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
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
from graphopt.passes.mixers import state as mixer_state  # noqa: E402

LAYERS, HEADS, HEAD = 6, 8, 64
DIMS = {"batch": 1, "seq": 4, "past": 28, "total": 32}


def cached_llama(path: Path) -> Path:
    """The decoder with past keys/values as inputs and the updated ones as outputs (legacy
    exporter: dynamic seq, past and total)."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, intermediate_size=1408, max_position_embeddings=16384,
                         attn_implementation="eager")
    module = models.CachedDecoder(LlamaModel(config).eval(), LAYERS, presents=True)
    pasts = [torch.randn(1, HEADS, 6, HEAD) for _ in range(2 * LAYERS)]
    names = ["input_ids", "attention_mask", *(f"past_{i}" for i in range(2 * LAYERS))]
    outputs = ["last_hidden_state", *(f"present_{i}" for i in range(2 * LAYERS))]
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
               **{n: {0: "batch", 2: "past"} for n in names[2:]}, **{n: {0: "batch", 2: "total"} for n in outputs[1:]}}
    torch.onnx.export(module, (torch.randint(0, 32000, (1, 4)), torch.ones(1, 10, dtype=torch.int64), *pasts), str(path),
                      dynamo=False, opset_version=17, input_names=names, output_names=outputs, dynamic_axes=dynamic)
    return path


def step_feeds(model: graphopt.Model, position: int) -> dict[str, np.ndarray]:
    """One new token after `position` earlier ones: random past keys/values or states."""
    rng = np.random.default_rng(position)
    feeds = {"input_ids": np.array([[7]], np.int64), "attention_mask": np.ones((1, position + 1), np.int64)}
    for value in model.ir.graph.inputs:
        if value.name.startswith("past_") and value.name[5:].isdigit():
            feeds[value.name] = rng.standard_normal((1, HEADS, position, HEAD)).astype(np.float32)
        elif value.name.startswith((mixer_state.STATE, mixer_state.NORMALIZER)):
            feeds[value.name] = np.abs(rng.standard_normal((1, *value.shape[1:]))).astype(np.float32)
        elif value.name == mixer_state.PAST_LENGTH:
            feeds[value.name] = np.array([position], np.int64)
    return feeds


def carried_bytes(feeds: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for k, a in feeds.items() if k.startswith("past_") and k != mixer_state.PAST_LENGTH)


def main() -> None:
    print(machine.line(), flush=True)  # the machines differ from day to day: name the CPU
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", default="512,2048,8192")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--mixers", default="linear:relu,linear:hedgehog")
    ap.add_argument("--json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    console = Console(emoji=False)  # mixer names such as linear:hedgehog are not emoji codes
    positions = [int(p) for p in args.positions.split(",")]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with console.status("exporting and swapping"):
            original = graphopt.optimize(cached_llama(tmp / "llama.onnx"), dims=DIMS).model
            contenders = {"original (KV cache)": original}
            for mixer in args.mixers.split(","):
                result = swap_mixers(original, mixer, steps=0, dims=DIMS)
                contenders[f"{mixer} (state)"] = result.model
        sessions = {name: session_for(str(graphopt.save(m, tmp / f"{i}.onnx")), disabled=())
                    for i, (name, m) in enumerate(contenders.items())}
        results: dict[str, dict[int, float]] = {}
        carried: dict[str, dict[int, int]] = {}
        for position in positions:
            feeds = {name: step_feeds(contenders[name], position) for name in sessions}
            with console.status(f"position {position}"):
                medians = timing.medians(timing.interleaved(
                    {n: (lambda s=s, f=feeds[n]: s.run(f)) for n, s in sessions.items()}, rounds=args.rounds, warmup=2))
            for name, t in medians.items():
                results.setdefault(name, {})[position] = t
                carried.setdefault(name, {})[position] = carried_bytes(feeds[name])
    table = Table(title=f"one decoding step, Llama-style {LAYERS}x512, batch 1, ORT CPU, median of {args.rounds} "
                        "interleaved rounds (ms; speed-up vs the KV cache; cache or state carried)", title_justify="left")
    table.add_column("contender")
    for position in positions:
        table.add_column(f"after {position} tokens")
    first = next(iter(results))
    for name, per in results.items():
        table.add_row(name, *(f"{per[p] * 1e3:.2f} ({results[first][p] / per[p]:.2f}x; {carried[name][p] / 2**20:.1f} MiB)"
                              for p in positions))
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": results, "carried_bytes": carried}, indent=1))


if __name__ == "__main__":
    main()
