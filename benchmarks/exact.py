"""ORT CPU latency: original vs ORT's transformers.optimizer vs graphopt's `exact` preset.

For each model (transformers architectures at MiniLM-like size with random weights,
MiniLM-L6 with real weights, RepVGG- and MobileOne-style convnets), batch 1,
sequence 128 (images 224x224): every contender runs in this one process, in
interleaved rounds, in an ORT session with its default optimizations (what a
deployment uses). Prints medians and ratios against the original; `--json` writes them.

    .venv/bin/python benchmarks/exact.py [--exporter legacy|dynamo] [--rounds 15] [--models bert,gpt2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import convnets  # noqa: E402
import models  # noqa: E402

import graphopt  # noqa: E402
from graphopt import machine  # noqa: E402
from graphopt import feeds  # noqa: E402

SIZE = dict(hidden=384, layers=6, heads=6, intermediate=1536)
ORT_TYPES = {"bert": "bert", "distilbert": "bert", "roberta": "bert", "gpt2": "gpt2", "llama": "bert", "qwen2": "bert", "vit": "vit", "minilm": "bert"}


def text_config(arch: str) -> dict:
    h, n, a, i = SIZE["hidden"], SIZE["layers"], SIZE["heads"], SIZE["intermediate"]
    base = {
        "bert": dict(vocab_size=30522, hidden_size=h, num_hidden_layers=n, num_attention_heads=a, intermediate_size=i),
        "distilbert": dict(vocab_size=30522, dim=h, n_layers=n, n_heads=a, hidden_dim=i),
        "roberta": dict(vocab_size=50265, hidden_size=h, num_hidden_layers=n, num_attention_heads=a, intermediate_size=i),
        "gpt2": dict(vocab_size=50257, n_embd=h, n_layer=n, n_head=a),
        "llama": dict(vocab_size=32000, hidden_size=h, num_hidden_layers=n, num_attention_heads=a, num_key_value_heads=2, intermediate_size=i),
        "qwen2": dict(vocab_size=32000, hidden_size=h, num_hidden_layers=n, num_attention_heads=a, num_key_value_heads=2, intermediate_size=i),
        "vit": dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=a, intermediate_size=i, image_size=224, patch_size=16),
    }
    return base[arch]


def build(name: str, exporter: str, out: Path) -> Path:
    path = out / f"{name}.onnx"
    if name in ("repvgg", "mobileone"):
        block = convnets.RepVGGBlock if name == "repvgg" else convnets.MobileOneBlock
        net = convnets.Net(block, blocks=4, c=32).eval()
        torch.onnx.export(net, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
        return path
    if name == "minilm":
        module, _ = models.minilm()
        args, names, dynamic = models.token_inputs(30522, 1, 128), ["input_ids", "attention_mask"], models.DYNAMIC
    else:
        import transformers

        model_cls, config_cls, _ = models.ARCHS[name]
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**text_config(name), attn_implementation="eager")).eval()
        if name == "vit":
            module, args, names, dynamic = models.PixelLastHidden(model), (torch.randn(1, 3, 224, 224),), ["pixel_values"], {"pixel_values": {0: "batch"}}
        else:
            module, args, names, dynamic = models.LastHidden(model), models.token_inputs(1000, 1, 128), ["input_ids", "attention_mask"], models.DYNAMIC
    return models.export(module, args, names, dynamic, path, exporter)


def ort_optimizer(path: Path, name: str) -> Path | str:
    from onnxruntime.transformers import optimizer

    try:
        heads, hidden = (12, 384) if name == "minilm" else (SIZE["heads"], SIZE["hidden"])
        optimized = optimizer.optimize_model(str(path), model_type=ORT_TYPES.get(name, "bert"), num_heads=heads, hidden_size=hidden)
        target = path.with_name(f"{path.stem}.ortopt.onnx")
        optimized.save_model_to_file(str(target))
        return target
    except Exception as exc:  # the anchor fails on some exports: report, do not hide
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def session(path: Path, disabled: list[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # Interleaved sessions must not spin: a spinning pool steals the cores from the next session
    # (graphopt.backends.ort.session explains; numbers before this line was added are inflated).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def main() -> int:
    print(machine.line(), flush=True)  # the machines differ from day to day: name the CPU
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exporter", default="legacy", choices=["legacy", "dynamo"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", default="bert,distilbert,roberta,gpt2,llama,qwen2,vit,minilm,repvgg,mobileone")
    parser.add_argument("--json")
    parser.add_argument("--disable-ort-fusions", default="",
                        help="comma-separated ORT optimizer names to turn off for every contender, e.g. SkipLayerNormFusion "
                             "(FACTS.md: its kernel is 6-8x slower than Add + LayerNormalization on this CPU)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name in args.models.split(","):
            path = build(name, args.exporter, out)
            model = graphopt.load(path)
            dims = {"batch": 1, "seq": 128}
            result = graphopt.optimize(model, dims=dims)
            ours = graphopt.save(result.model, out / f"{name}.graphopt.onnx")
            contenders = {"original": path, "ort-optimizer": ort_optimizer(path, name), "graphopt": ours}
            inputs = feeds.make_inputs(model, dims=dims)
            disabled = [d for d in args.disable_ort_fusions.split(",") if d]
            sessions = {k: session(v, disabled) for k, v in contenders.items() if isinstance(v, Path)}
            times = {k: [] for k in sessions}
            for s in sessions.values():  # warm up
                s.run(None, inputs)
            for _ in range(args.rounds):  # interleaved rounds
                for k, s in sessions.items():
                    start = time.perf_counter()
                    s.run(None, inputs)
                    times[k].append(time.perf_counter() - start)
            medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            results[name] = {"median_ms": medians, "ratio_vs_original": {k: medians["original"] / v for k, v in medians.items()},
                             "failed": {k: v for k, v in contenders.items() if isinstance(v, str)},
                             "validated": result.report.validation.passed, "rewrites": result.report.rewrites()}
            row = "  ".join(f"{k} {m:7.2f} ms ({medians['original'] / m:4.2f}x)" for k, m in medians.items())
            failed = "  ".join(f"{k} FAILED: {v}" for k, v in results[name]["failed"].items())
            print(f"{name:11s} {row}  {failed}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
