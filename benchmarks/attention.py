"""Attention benchmark (issue 4): graphopt --target ort-cpu vs the original model, ORT's
transformers.optimizer and onnxscript's optimize_for_ort, all in ORT CPU, in one process,
interleaved. Cases: MiniLM-L6 (real weights, dynamo export) at seq 128 and 512, and a
BERT-base-size model (random weights) at seq 128, batch 1.

    .venv/bin/python benchmarks/attention.py [--rounds 40] [--cases minilm-128,minilm-512,bert-base-128] [--json out.json]

Prints medians, speed-ups against the original, graphopt against the best anchor, and
the lowering graphopt's measurement chose.
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
from graphopt import machine  # noqa: E402
from graphopt import benchmark as bench  # noqa: E402

CASES = ("minilm-128", "minilm-512", "bert-base-128")


def _minilm(tmp: Path) -> Path:
    module, tokenizer = models.minilm()
    enc = tokenizer(models.SENTENCES, padding=True, return_tensors="pt")
    model = graphopt.load(module, example_inputs=(enc["input_ids"], enc["attention_mask"]), dynamic_shapes=models.DYNAMIC)
    return graphopt.save(model, tmp / "minilm.onnx")


def _bert_base(tmp: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(attn_implementation="sdpa")  # BERT-base: 12 layers, hidden 768, 12 heads
    module = models.LastHidden(BertModel(config).eval())
    model = graphopt.load(module, example_inputs=models.token_inputs(config.vocab_size, 2, 16), dynamic_shapes=models.DYNAMIC)
    return graphopt.save(model, tmp / "bert-base.onnx")


def _feeds(seq: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(0, vocab, (1, seq), dtype=np.int64), "attention_mask": np.ones((1, seq), np.int64)}


def main() -> None:
    print(machine.line(), flush=True)  # the machines differ from day to day: name the CPU
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    console = Console()
    results = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        paths: dict[str, Path] = {}
        for case in args.cases.split(","):
            name, seq = case.rsplit("-", 1)
            if name not in paths:
                paths[name] = _minilm(tmp) if name == "minilm" else _bert_base(tmp)
            feeds = _feeds(int(seq), 30522)
            with console.status(f"{case}: optimizing, selecting lowerings, timing"):
                result = bench.bench(paths[name], inputs=feeds, rounds=args.rounds)
            results[case] = result.to_dict()
            table = Table(title=f"{case} (batch 1, seq {seq}, {args.rounds} interleaved rounds)", title_justify="left")
            for col in ("contender", "median ms", "vs original", "max abs err", "note"):
                table.add_column(col)
            for row in bench.format_rows(result):
                table.add_row(*row)
            console.print(table)
            lowering = next(c.detail.get("lowering") for c in result.contenders if c.name == "graphopt")
            if lowering:
                console.print(f"graphopt lowering: {lowering['choices']} timings {lowering['timings_ms']}", markup=False)
            console.print(f"graphopt vs best anchor: {result.graphopt_vs_best_anchor}x\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
