"""What is fastest on this CPU: graphopt's `--target cpu` against onnxruntime and OpenVINO.

Per model and batch, every contender runs in this one process, in interleaved rounds
(graphopt.bench), on the same inputs; medians, ratios against onnxruntime fp32 on the original,
and fidelity (the lowest per-row cosine of the outputs to onnxruntime fp32; for MiniLM the rows
are sentence embeddings):
    original        onnxruntime fp32, default session
    ort-optimizer   onnxruntime.transformers.optimizer
    onnxscript      onnxscript's optimize_for_ort
    openvino        OpenVINO's default on the original (its own precision: bf16 where the CPU has it)
    openvino-fp32   OpenVINO with the fp32 hint
    graphopt ort-cpu    optimize(target="ort-cpu"): exact preset + the measured ORT lowering, run in a
                    default session (no session options)
    graphopt cpu    optimize(target="cpu"): exact preset, then the fastest runtime, fp32 only
    graphopt cpu bf16   the same with precision="bf16", fidelity=0.999
Models: MiniLM-L6 (real weights, sentence embeddings), BERT-base size (random weights), ViT
(MiniLM-like size), RepVGG- and MobileOne-style convnets; sequence 128, images 224x224.
The CPU model and its flags are printed first.

    .venv/bin/python benchmarks/cpu.py [--models minilm,bert-base,vit,repvgg,mobileone] [--batches 1,32] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import exact  # noqa: E402  (the model builders of benchmarks/exact.py)
import models  # noqa: E402

import graphopt  # noqa: E402
from graphopt import benchmark, machine  # noqa: E402

ANCHORS = ("original", "ort-optimizer", "onnxscript", "openvino", "openvino-fp32")
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def build(name: str, out: Path) -> Path:
    if name == "minilm":  # sentence embeddings (mean-pooled, normalized), real weights
        module, _ = models.minilm()
        args = models.token_inputs(30522, 2, 128)
        return models.export(module, args, ["input_ids", "attention_mask"], models.DYNAMIC, out / "minilm.onnx", "legacy")
    if name == "bert-base":
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        model = BertModel(BertConfig(**BERT_BASE, attn_implementation="eager")).eval()
        args = models.token_inputs(1000, 2, 128)
        return models.export(models.LastHidden(model), args, ["input_ids", "attention_mask"], models.DYNAMIC,
                             out / "bert-base.onnx", "legacy")
    return exact.build(name, "legacy", out)


def dims_for(name: str, batch: int) -> dict[str, int]:
    return {"batch": batch, "seq": 128}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,bert-base,vit,repvgg,mobileone")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(machine.line(), flush=True)
    results = {"machine": machine.describe(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = build(name, Path(tmp))
            for batch in (int(b) for b in args.batches.split(",")):
                source = graphopt.load(path)
                inputs = graphopt.feeds.make_inputs(source, dims=dims_for(name, batch))
                ort_cpu = graphopt.optimize(source, inputs=inputs, target="ort-cpu")
                fp32 = graphopt.optimize(source, inputs=inputs, target="cpu")
                bf16 = graphopt.optimize(source, inputs=inputs, target="cpu", precision="bf16", fidelity=0.999)
                result = benchmark.bench(source, target="cpu", against=ANCHORS, inputs=inputs, rounds=args.rounds,
                                         optimized={"graphopt ort-cpu": ort_cpu.model, "graphopt cpu": fp32.model,
                                                    "graphopt cpu bf16": bf16.model})
                chosen = {"graphopt cpu": fp32.report.lowering["chosen"], "graphopt cpu bf16": bf16.report.lowering["chosen"]}
                results["models"][f"{name} b{batch}"] = result.to_dict() | {"chosen": chosen}
                print(f"\n{name}, batch {batch} ({', '.join(f'{k}: {v}' for k, v in result.inputs.items())}); "
                      f"graphopt chose {chosen}", flush=True)
                for c in result.contenders:
                    if c.error:
                        print(f"  {c.name:18s} failed: {c.error}")
                    else:
                        print(f"  {c.name:18s} {c.median_ms:9.2f} ms  {c.speedup:5.2f}x  min cosine {c.min_cosine:.6f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
