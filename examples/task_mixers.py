"""Token mixers on trained models, measured on a task: accuracy / perplexity before and after
each swap.

    .venv/bin/python examples/task_mixers.py --task vit      # ViT on scikit-learn's handwritten digits
    .venv/bin/python examples/task_mixers.py --task charlm   # char-level causal LM on Python's own sources

Each trains a small model on the CPU for a fixed number of steps (seeded), exports it with graphopt,
runs the exact preset (canonical attention), then for every mixer swaps half of the attention
layers (the most swappable, by calibration) and all of them, calibrated on training data, and
evaluates on held-out data in onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import graphopt
from graphopt.passes.mixers import swap_mixers
from graphopt.passes.mixers import MIXERS


class Logits(torch.nn.Module):
    def __init__(self, model, key: str):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return getattr(self.model(x), "logits")


def _named_logits(model: graphopt.Model) -> graphopt.Model:
    """Name the output `logits`, so the fidelity report adds the KL divergence for it."""
    model.ir.graph.outputs[0].name = "logits"
    return model


def digits(size: int = 16):
    """scikit-learn's handwritten digits as [N, 1, size, size] floats in [0, 1], their labels, and
    a seeded split (1400 train, 397 test)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = torch.nn.functional.interpolate(images, size=size, mode="bilinear")
    labels = torch.as_tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images, labels, order[:1400], order[1400:]


def train_vit(steps: int):
    """A transformers ViT trained on the digits at 16x16 (seeded, by step count), in eval mode,
    with the data: (model, images, labels, train, test)."""
    from transformers import ViTConfig, ViTForImageClassification

    images, labels, train, test = digits()
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128, num_labels=10, attn_implementation="sdpa")
    model = ViTForImageClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(steps):  # a fixed number of steps, so that every run trains the same model
        i = (step * 64) % (len(train) - 63)
        idx = train[i:i + 64]
        loss = torch.nn.functional.cross_entropy(model(pixel_values=images[idx]).logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), images, labels, train, test


def vit_task(steps: int):
    model, images, labels, train, test = train_vit(steps)
    module = Logits(model, "logits")
    onnx_model = _named_logits(graphopt.load(module, example_inputs=(images[:2],), dynamic_shapes=({0: "batch"},)))
    calib = [{"x": images[train[i:i + 64]].numpy()} for i in range(0, 256, 64)]
    held = [{"x": images[test[i:i + 128]].numpy()} for i in range(0, len(test), 128)]
    test_labels = labels[test].numpy()

    def metric(m):
        preds = np.concatenate([graphopt.verify.run(m, f)["logits"].argmax(-1) for f in held])
        return float((preds == test_labels).mean())

    return onnx_model, calib, held, metric, "accuracy", {"x": {"batch": 64}}


def charlm_task(steps: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join((stdlib / name).read_bytes() for name in ("argparse.py", "textwrap.py", "pathlib.py", "shutil.py"))
    data = torch.as_tensor(np.frombuffer(text, dtype=np.uint8).astype(np.int64))
    split = int(len(data) * 0.9)
    train_data, test_data = data[:split], data[split:]
    seq = 128
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=seq, n_embd=128, n_layer=4, n_head=4, attn_implementation="sdpa")
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):  # a fixed number of steps, so that every run trains the same model
        starts = torch.randint(0, len(train_data) - seq - 1, (32,), generator=g)
        batch = torch.stack([train_data[s:s + seq + 1] for s in starts])
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    module = Logits(model, "logits")
    example = train_data[: 2 * seq].reshape(2, seq)
    onnx_model = _named_logits(graphopt.load(module, example_inputs=(example,), dynamic_shapes=({0: "batch"},)))

    def windows(source, count, offset):
        return np.stack([source[offset + i * seq: offset + (i + 1) * seq + 1].numpy() for i in range(count)])

    calib = [{"x": windows(train_data, 16, k * 16 * seq)[:, :-1]} for k in range(4)]
    held_windows = [windows(test_data, 16, k * 16 * seq) for k in range(4)]
    held = [{"x": w[:, :-1]} for w in held_windows]

    def metric(m):
        nll, count = 0.0, 0
        for f, w in zip(held, held_windows):
            logits = graphopt.verify.run(m, f)["logits"].astype(np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll -= np.take_along_axis(logp, w[:, 1:, None], -1).sum()
            count += w[:, 1:].size
        return math.exp(nll / count)

    return onnx_model, calib, held, metric, "perplexity", {"x": {"batch": 16}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["vit", "charlm"], required=True)
    ap.add_argument("--train-steps", type=int, default=None, help="optimizer steps (default: vit 600, charlm 500)")
    ap.add_argument("--steps", type=int, default=300, help="calibration steps per layer (Hedgehog)")
    ap.add_argument("--mixers", default=",".join(MIXERS))
    ap.add_argument("--json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    console = Console(emoji=False)  # mixer names such as linear:hedgehog are not emoji codes
    steps = args.train_steps or {"vit": 600, "charlm": 500}[args.task]
    with console.status(f"training the {args.task} model for {steps} steps"):
        model, calib, held, metric, metric_name, _ = (vit_task if args.task == "vit" else charlm_task)(steps)
    exact = graphopt.optimize(model, inputs=calib[0]).model
    layers_total = len(graphopt.summary.attention_layers(exact))
    baseline = metric(exact)
    rows = [("original", "-", f"{baseline:.4f}", "-")]
    results = {"original": baseline}
    for mixer in args.mixers.split(","):
        for layers in (f"best:{layers_total // 2}", "all"):
            with console.status(f"{mixer} on {layers}"):
                mixed = swap_mixers(exact, mixer, calib=calib, holdout=held, layers=layers, steps=args.steps)
            value = metric(mixed.model)
            kl = next(iter(mixed.report["end_to_end"].values())).get("kl_divergence")
            results[f"{mixer} {layers}"] = {"metric": value, "layers": mixed.report["layers_swapped"], "kl": kl}
            rows.append((mixer, f"{len(mixed.report['layers_swapped'])}/{layers_total} {mixed.report['layers_swapped']}",
                         f"{value:.4f}", f"{kl:.4f}" if kl is not None else "-"))
    table = Table(title=f"{args.task}: held-out {metric_name} before and after each swap "
                        f"({args.steps} calibration steps)", title_justify="left")
    for col in ("mixer", "layers swapped", metric_name, "KL to original"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
