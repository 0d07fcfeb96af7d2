"""Token mixers on MiniLM-L6 with its real weights: sentence-embedding fidelity.

Calibrates each mixer on one set of sentences (615 by default: the first half of
`sentences.split()` plus more that the same families make, none of them a measured sentence;
split in two: fit, and held-out for the mixer's own choices: layers, stopping points, the
output correction) and measures, on the 135 sentences the calibration never saw, the cosine
between the swapped model's sentence embeddings (mean pooling, normalized) and the original's,
with half of the attention layers (the 3 whose swap alone moves the output least) and with all
6 swapped; with and without the output-side correction; and the fitting cost per layer.

    .venv/bin/python examples/mixer_fidelity.py [--steps 300] [--mixers linear:hedgehog,pool] [--features 4]
        [--calib-sentences 615] [--layer-sets best:3,all] [--json out.json]
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
from graphopt import machine  # noqa: E402
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
    ap.add_argument("--capped-window", type=int, default=1,
                    help="also run the window mixer with this max window: the hybrid's window on these sentences "
                         "(a quarter of the median sentence, 15 tokens: window 1), so the two share a window size (0: skip)")
    ap.add_argument("--calib-sentences", type=int, default=615,
                    help="calibration sentences (the first 135 of the split, then more the same families make, never a held-out one)")
    ap.add_argument("--layer-sets", default="best:3,all", help="comma-separated --layers values to run (default: best:3,all)")
    ap.add_argument("--features", type=int, default=1, help="the Hedgehog map's width in head sizes (hedgehog, hybrid)")
    ap.add_argument("--json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    console = Console(emoji=False)  # mixer names such as linear:hedgehog are not emoji codes
    module, tokenizer = load_minilm()
    calib_texts, held_texts = sentences.split(calibration=args.calib_sentences)
    assert not set(calib_texts) & set(held_texts)
    calib, held = batches(tokenizer, calib_texts), batches(tokenizer, held_texts)
    model = graphopt.load(module, example_inputs=tuple(__import__("torch").as_tensor(calib[0][k]) for k in ("input_ids", "attention_mask")),
                          dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    exact = graphopt.optimize(model, inputs=calib[0]).model
    references = [graphopt.verify.run(exact, f) for f in held]
    rows, results = [], {}
    runs = [(m, None) for m in args.mixers.split(",")]
    if args.capped_window and "window" in args.mixers.split(","):
        runs.append(("window", args.capped_window))
    for mixer, cap in runs:
        for layers in args.layer_sets.split(","):
            label = {"best:3": "half (3/6)", "all": "all (6/6)"}.get(layers, layers)
            with console.status(f"{mixer}, {label}"):
                result = swap_mixers(exact, mixer, calib=calib, layers=layers, steps=args.steps, max_window=cap,
                                     features=args.features if mixer in ("linear:hedgehog", "hybrid") else 1)
            mixer_label = mixer if cap is None else f"{mixer} (max window {cap})"
            report = result.report
            plain = next(iter(graphopt.fidelity.end_to_end(references, result.uncorrected or result.model, held).values()))
            e2e = next(iter(graphopt.fidelity.end_to_end(references, result.model, held).values()))
            results[f"{mixer_label} {layers}"] = {**report, "test": e2e, "test_uncorrected": plain}
            kept = (report.get("correction") or {}).get("kept")
            rows.append((mixer_label, label, str(report["layers_swapped"]), f"{plain['mean_cosine']:.4f} / {plain['min_cosine']:.4f}",
                         f"{e2e['mean_cosine']:.4f} / {e2e['min_cosine']:.4f}" + ("" if kept else " (not kept)"),
                         f"{report['calibration']['fit_seconds_per_layer']:.2f}"))
    table = Table(title=f"MiniLM-L6 sentence embeddings: cosine to the original on {len(held_texts)} sentences the "
                        f"calibration never saw (calibrated on {len(calib_texts)} others, {args.steps} steps); "
                        f"{machine.line()}", title_justify="left")
    for col in ("mixer", "layers swapped", "which", "mean / min cosine", "with output correction", "fit s / layer"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
