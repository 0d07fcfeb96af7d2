"""Structured pruning on MiniLM-L6 (real weights, issue 29 item 2): how much of the linear work
`prune=FORM` (FFN neurons, attention heads, whole blocks) removes at a fidelity bound, and what
that buys in a default onnxruntime session.

Calibration: `--calib` sentences from examples/sentences.py (fit), 64 held-out sentences
(the step's bound), and the other 71 held-out sentences, never seen by the step, for the fresh
cosine. Inputs padded to 64 tokens; the step leaves padded tokens out of its fits. One process,
interleaved rounds; medians, ratios, the CPU model.

    .venv/bin/python benchmarks/prune.py [--bounds 0.995,0.99] [--form all] [--calib 1024] [--batch 1,32] [--rounds 20]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path[:0] = [str(Path(__file__).parents[1] / "tests"), str(Path(__file__).parents[1] / "examples")]
import models  # noqa: E402
import sentences  # noqa: E402

import graphopt  # noqa: E402
from graphopt import exporters, machine, timing, verify  # noqa: E402
from graphopt.passes.prune.step import linear_flops  # noqa: E402
from graphopt.sessions import session_for  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bounds", default="0.995,0.99")
    parser.add_argument("--form", default="all", help="the pruning form (ffn, heads, blocks, ffn+heads, all)")
    parser.add_argument("--calib", type=int, default=1024, help="calibration sentences (fit rows)")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    console = Console(width=220)
    warnings.simplefilter("ignore")
    module, tokenizer = models.minilm()
    calib_s, held_s = sentences.split(0, calibration=args.calib)

    def encode(texts):
        e = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="np")
        return {k: e[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    example = tokenizer(held_s[:2], padding=True, return_tensors="pt")
    source = graphopt.load(module, example_inputs=(example["input_ids"], example["attention_mask"]),
                           dynamic_shapes=models.DYNAMIC)
    exact = graphopt.optimize(source).model
    n = len(calib_s) // 2 * 2
    calib = [encode(calib_s[: n // 2]), encode(calib_s[n // 2: n]), encode(held_s[:32]), encode(held_s[32:64])]
    fresh = encode(held_s[64:135])
    reference = verify.run(exact, fresh)
    variants = {"exact (fp32)": (exact, None)}
    for bound in (float(b) for b in args.bounds.split(",")):
        start = time.perf_counter()
        result = graphopt.optimize(exact, passes=["eliminate-dead-code"], prune=args.form, fidelity=bound, calib=calib)
        step = result.report.steps[-1]
        variants[f"pruned @ {bound}"] = (result.model, {"seconds": time.perf_counter() - start, "step": step})
    table = Table(title=f"pruning ({args.form}), MiniLM-L6 real weights, seq 64, onnxruntime default session - {machine.line()}",
                  title_justify="left")
    for col in ("model", "batch", "median ms", "speed-up", "linear FLOPs/token", "removed", "held-out mean cos",
                "fresh mean / min cos", "optimize s"):
        table.add_column(col)
    base_flops = linear_flops(exact)
    for batch in (int(b) for b in args.batch.split(",")):
        feeds = {k: np.repeat(v[:1], batch, axis=0) if batch == 1 else np.resize(v, (batch, v.shape[1])) for k, v in fresh.items()}
        runners = {name: session_for(exporters.to_proto(m).SerializeToString(), disabled=()) for name, (m, _) in variants.items()}
        medians = timing.medians(timing.interleaved({k: (lambda r=r: r.run(feeds)) for k, r in runners.items()}, rounds=args.rounds))
        base = medians["exact (fp32)"]
        for name, (m, info) in variants.items():
            flops = linear_flops(m)
            got = verify.run(m, fresh)
            cos = [verify.min_cosine({k: reference[k][i:i + 1] for k in reference}, {k: got[k][i:i + 1] for k in got})
                   for i in range(len(fresh["input_ids"]))]
            held = "-" if info is None else f"{info['step'].check['min_cosine']:.5f}"
            table.add_row(name, str(batch), f"{medians[name] * 1e3:.2f}", f"{base / medians[name]:.3f}x", f"{flops:,}",
                          f"{1 - flops / base_flops:.1%}", held, f"{np.mean(cos):.5f} / {np.min(cos):.5f}",
                          "-" if info is None else f"{info['seconds']:.0f}")
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
