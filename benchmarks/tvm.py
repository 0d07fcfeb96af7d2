"""TVM benchmark (issue 5): TVM untuned vs TVM MetaSchedule-tuned vs onnxruntime, same model,
same shapes, one process, interleaved rounds; medians and ratios against ORT.

Model: MiniLM-L6 with real weights (dynamo export) through graphopt's exact preset, batch 1,
seq 128 by default; --model block takes one BERT-style encoder layer at MiniLM size instead
(tuning then covers every kernel with fewer trials).

    .venv/bin/python benchmarks/tvm.py [--trials 256] [--seq 128] [--model minilm|block] [--rounds 10] [--db DIR]

The tuning database (default benchmarks/.tvm-tuning/<model>-<seq>) is reused across runs:
a second run with the same --db measures only the extra trials asked for.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
# This file is named tvm.py: keep its own folder off the import path so `import tvm` finds TVM.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import models  # noqa: E402

import graphopt  # noqa: E402
from graphopt.sessions import session_for  # noqa: E402
from graphopt import machine  # noqa: E402
from graphopt import exporters, timing  # noqa: E402
from graphopt.backends import tvm as tvm_backend  # noqa: E402


def _model(kind: str, seq: int, tmp: Path):
    if kind == "minilm":
        module, tokenizer = models.minilm()
        enc = tokenizer(models.SENTENCES, padding=True, return_tensors="pt")
        model = graphopt.load(module, example_inputs=(enc["input_ids"], enc["attention_mask"]), dynamic_shapes=models.DYNAMIC)
    else:
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(hidden_size=384, num_hidden_layers=1, num_attention_heads=12, intermediate_size=1536,
                            attn_implementation="sdpa")
        module = models.LastHidden(BertModel(config).eval())
        model = graphopt.load(module, example_inputs=models.token_inputs(config.vocab_size, 2, 16), dynamic_shapes=models.DYNAMIC)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 30000, (1, seq), dtype=np.int64), "attention_mask": np.ones((1, seq), np.int64)}
    return graphopt.optimize(model, inputs=feeds).model, feeds


def main() -> None:
    print(machine.line(), flush=True)  # the machines differ from day to day: name the CPU
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model", choices=["minilm", "block"], default="minilm")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--db")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    console = Console()
    db = Path(args.db or Path(__file__).parent / ".tvm-tuning" / f"{args.model}-{args.seq}")
    with tempfile.TemporaryDirectory() as tmp:
        model, feeds = _model(args.model, args.seq, Path(tmp))
        shapes = {k: v.shape for k, v in feeds.items()}
        start = time.perf_counter()
        untuned = tvm_backend.prepare(tvm_backend.compile(model, shapes=shapes))
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        with console.status(f"tuning {args.trials} trials into {db}") as status:
            compiled = tvm_backend.compile(model, shapes=shapes, tuning_db=db, trials=args.trials,
                                           progress=lambda n, total: status.update(f"tuning: {n} records in {db}"))
        tune_s = time.perf_counter() - start
        tuned = tvm_backend.prepare(compiled)
        ort = session_for(exporters.to_proto(model).SerializeToString(), disabled=())
        reference = ort.run(feeds)
        for name, ex in (("tvm untuned", untuned), ("tvm tuned", tuned)):
            got = ex.run(feeds)
            err = max(float(np.max(np.abs(got[k] - v))) for k, v in reference.items())
            console.print(f"{name}: max abs error vs ORT {err:.1e}")
        medians = timing.medians(timing.interleaved(
            {"onnxruntime": lambda: ort.run(feeds), "tvm untuned": lambda: untuned.run(feeds),
             "tvm tuned": lambda: tuned.run(feeds)}, rounds=args.rounds, warmup=1))
    table = Table(title=f"{args.model} batch 1 seq {args.seq}: {args.trials} trials this run, "
                        f"{compiled.tuning_records} records in the database; {args.rounds} interleaved rounds",
                  title_justify="left")
    for col in ("contender", "median ms", "vs onnxruntime"):
        table.add_column(col)
    for name, t in medians.items():
        table.add_row(name, f"{t * 1e3:.2f}", f"{medians['onnxruntime'] / t:.3f}x")
    console.print(table)
    console.print(f"untuned compile {compile_s:.1f} s; tuning + tuned compile {tune_s:.1f} s; "
                  f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")


if __name__ == "__main__":
    main()
