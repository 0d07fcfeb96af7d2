"""Token mixers on MiniLM-L6 with its real weights: sentence-embedding fidelity.

Calibrates each mixer on one set of sentences and measures, on a disjoint set, the cosine
between the swapped model's sentence embeddings (mean pooling, normalized) and the
original's, with half of the attention layers (the 3 with the lowest calibrated error) and
with all 6 swapped.

    .venv/bin/python examples/mixer_fidelity.py [--steps 300] [--mixers linear:hedgehog,pool] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import graphopt  # noqa: E402
from graphopt.passes.mixers import swap_mixers  # noqa: E402
from graphopt.passes.mixers import MIXERS  # noqa: E402
from minilm_demo import load_minilm  # noqa: E402
import sentences  # noqa: E402


def batches(tokenizer, texts, size=16):
    out = []
    for i in range(0, len(texts), size):
        enc = tokenizer(texts[i:i + size], padding=True, return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype("int64"), "attention_mask": enc["attention_mask"].astype("int64")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--mixers", default=",".join(MIXERS))
    ap.add_argument("--json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    console = Console(emoji=False)  # mixer names such as linear:hedgehog are not emoji codes
    module, tokenizer = load_minilm()
    calib_texts, held_texts = sentences.split()
    calib, held = batches(tokenizer, calib_texts), batches(tokenizer, held_texts)
    model = graphopt.load(module, example_inputs=tuple(__import__("torch").as_tensor(calib[0][k]) for k in ("input_ids", "attention_mask")),
                          dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    exact = graphopt.optimize(model, inputs=calib[0]).model
    rows, results = [], {}
    for mixer in args.mixers.split(","):
        for layers, label in (("best:3", "half (3/6)"), ("all", "all (6/6)")):
            with console.status(f"{mixer}, {label}"):
                result = swap_mixers(exact, mixer, calib=calib, holdout=held, layers=layers, steps=args.steps)
            e2e = next(iter(result.report["end_to_end"].values()))
            results[f"{mixer} {layers}"] = result.report
            rows.append((mixer, label, str(result.report["layers_swapped"]), f"{e2e['mean_cosine']:.4f}", f"{e2e['min_cosine']:.4f}"))
    table = Table(title=f"MiniLM-L6 sentence embeddings: cosine to the original on {len(held_texts)} held-out sentences "
                        f"(calibrated on {len(calib_texts)} others, {args.steps} steps)", title_justify="left")
    for col in ("mixer", "layers swapped", "which", "mean cosine", "min cosine"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
