"""Reduced precision on this CPU: graphopt's int8 (and `--target cpu --precision auto`) against
onnxruntime's quantizers and OpenVINO, latency and fidelity in one process.

Models: MiniLM-L6 (real weights; sentence embeddings, mean-pooled and normalized), BERT-base
size (random weights; token states), and two models trained here on scikit-learn's handwritten
digits (seeded, by step count): the ViT of examples/task_mixers.py (16x16, 4 layers, hidden 64)
and a RepVGG-style convnet (tests/convnets.py, 4 blocks of 32 channels, 32x32 inputs).
Fidelity: mean / min cosine per row (MiniLM: per held-out sentence, 128 sentences the calibration
never saw; BERT-base: per sequence of random tokens; digits: per test image's logits) to
onnxruntime fp32 on the original; for the digits models also test accuracy and top-1 agreement
with fp32 on the 397 test images. Latency: medians of interleaved rounds at batch 1 and 32
(sequence 128; images at their size), every contender in this process:
    ort-fp32            the original, onnxruntime default session
    ort-dynamic         onnxruntime quantize_dynamic (int8 weights, per channel)
    ort-static          onnxruntime quantize_static (QDQ, int8 per channel, MinMax, the calibration sentences)
    openvino            OpenVINO's default on the original (bf16 where the CPU has it)
    nncf                NNCF quantize (model_type TRANSFORMER) then OpenVINO, quantized in NNCF's own
                        environment (--nncf-python; benchmarks/nncf_anchor.py), timed here
    graphopt int8 F     optimize(precision="int8", fidelity=F, target="ort-cpu"), F in 0.999, 0.995
    graphopt cpu F      optimize(precision="auto", fidelity=F, target="cpu"): int8 layers, then the
                        fastest runtime (onnxruntime or OpenVINO, with bf16 hints allowed)
The CPU model and flags are printed first.

    .venv/bin/python benchmarks/precision.py [--models minilm,bert-base,vit-digits,repvgg-digits]
        [--batches 1,32] [--rounds 10] [--nncf-python /path/to/nncf-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import models  # noqa: E402

import graphopt  # noqa: E402
from graphopt.sessions import session_for  # noqa: E402
from graphopt import machine, runtimes, timing  # noqa: E402
from graphopt.backends import openvino  # noqa: E402

BOUNDS = (0.999, 0.995)


def text_batches(name: str, tokenizer, count: int, seed: int):
    """(fit batches, held-out batches) of 16: real sentences for MiniLM, random tokens otherwise."""
    if name == "minilm":
        import sentences
        from mixer_fidelity import batches

        fit, held = sentences.split(seed)
        return batches(tokenizer, fit[:count], 16), batches(tokenizer, held[:128], 32)
    rng = np.random.default_rng(seed)

    def make(n):
        ids = rng.integers(0, 30522, (n, 128))
        return {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((n, 128), np.int64)}
    return [make(16) for _ in range(count // 16)], [make(32) for _ in range(2)]


def export(name: str, out: Path):
    if name == "minilm":
        module, tokenizer = models.minilm()
    else:
        import torch
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        from cpu import BERT_BASE

        module = models.LastHidden(BertModel(BertConfig(**BERT_BASE, attn_implementation="eager")).eval())
        tokenizer = None
    path = models.export(module, models.token_inputs(1000, 2, 128), ["input_ids", "attention_mask"], models.DYNAMIC,
                         out / f"{name}.onnx", "legacy")
    return path, tokenizer


def repvgg_digits(steps: int = 400):
    """A RepVGG-style convnet trained on the digits at 32x32 (seeded, by step count), in eval mode."""
    import convnets
    import task_mixers
    import torch

    images, labels, train, _ = task_mixers.digits(32)
    torch.manual_seed(0)
    net = convnets.Net(convnets.RepVGGBlock, blocks=4, c=32)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    net.train()
    for step in range(steps):
        i = (step * 64) % (len(train) - 63)
        idx = train[i:i + 64]
        loss = torch.nn.functional.cross_entropy(net(images[idx].repeat(1, 3, 1, 1)), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def task(name: str, out: Path, calib: int) -> dict:
    """path, fit / held-out batches, test labels (digits) and the NNCF model type of one model."""
    if name in ("minilm", "bert-base"):
        path, tokenizer = export(name, out)
        fit, held = text_batches(name, tokenizer, calib, 0)
        return {"path": path, "fit": fit, "held": held, "labels": None, "nncf_type": "transformer"}
    import task_mixers
    import torch

    if name == "vit-digits":
        model = task_mixers.vit_task(600)[0]
        images, labels, train, test = task_mixers.digits()
        path = graphopt.save(model, out / "vit-digits.onnx")
        nncf_type = "transformer"
    elif name == "repvgg-digits":
        net = repvgg_digits()
        images, labels, train, test = task_mixers.digits(32)
        images = images.repeat(1, 3, 1, 1)
        path = out / "repvgg-digits.onnx"
        torch.onnx.export(net, (images[:2],), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}})
        nncf_type = "cnn"
    else:
        raise SystemExit(f"unknown model {name}")
    input_name = graphopt.load(path).ir.graph.inputs[0].name
    fit = [{input_name: images[train[i:i + 32]].numpy()} for i in range(0, calib * 2, 32)]
    held = [{input_name: images[test[i:i + 32]].numpy()} for i in range(0, len(test), 32)]
    return {"path": path, "fit": fit, "held": held, "labels": labels[test].numpy(), "nncf_type": nncf_type}


class _Reader:
    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        return next(self.batches, None)


def ort_quantizers(path: Path, fit, out: Path) -> dict[str, Path | str]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    done: dict[str, Path | str] = {}
    try:
        quantize_dynamic(str(path), str(out / "dynamic.onnx"), weight_type=QuantType.QInt8, per_channel=True)
        done["ort-dynamic"] = out / "dynamic.onnx"
    except Exception as exc:  # an anchor that fails is a result
        done["ort-dynamic"] = f"failed: {exc}"
    try:
        quantize_static(str(path), str(out / "static.onnx"), _Reader(fit), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        done["ort-static"] = out / "static.onnx"
    except Exception as exc:
        done["ort-static"] = f"failed: {exc}"
    return done


def nncf_model(path: Path, fit, python: str | None, out: Path, model_type: str = "transformer"):
    """NNCF + OpenVINO, quantized in NNCF's own environment (`python`), compiled here."""
    import subprocess

    if not python:
        return "not measured: pass --nncf-python (an environment with nncf; it is not a project dependency)"
    calib = graphopt.exporters.write_npz({f"{k}.{i}": v for i, b in enumerate(fit) for k, v in b.items()}, out / "nncf.npz")
    target = out / f"{path.stem}.nncf.xml"
    done = subprocess.run([python, str(Path(__file__).with_name("nncf_anchor.py")), str(path), str(calib), str(target),
                           model_type],
                          capture_output=True, text=True)
    if done.returncode:
        return f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    import openvino as ov

    return ov.Core().compile_model(str(target), "CPU")


class _OV:
    """An openvino.CompiledModel with the runner interface."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def run(self, feeds):
        result = self.request.infer({p.get_any_name(): feeds[p.get_any_name()] for p in self.compiled.inputs})
        return {p.get_any_name(): np.array(result[p]) for p in self.compiled.outputs}


def runner(model):
    """onnxruntime (default session) or OpenVINO, as graphopt's --target cpu chose."""
    return runtimes.executable_for(model)


def cosines(reference, got) -> np.ndarray:
    rows = []
    for ref, out in zip(reference, got):
        a = next(iter(ref.values())).astype(np.float64)
        b = next(iter(out.values())).astype(np.float64)
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        rows.append((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30))
    return np.concatenate(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,bert-base,vit-digits,repvgg-digits")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calib", type=int, default=64, help="calibration sentences (fit)")
    ap.add_argument("--nncf-python", help="the python of an environment with nncf (the NNCF + OpenVINO anchor)")
    ap.add_argument("--json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(machine.line(), flush=True)
    results = {"machine": machine.describe(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name in args.models.split(","):
            t = task(name, out, args.calib)
            path, fit, held = t["path"], t["fit"], t["held"]
            source = graphopt.load(path)
            runners = {"ort-fp32": session_for(str(path), disabled=())}
            notes = {}
            for key, made in ort_quantizers(path, fit, out).items():
                if isinstance(made, Path):
                    runners[key] = session_for(str(made), disabled=())
                else:
                    notes[key] = made
            runners["openvino"] = openvino.compile(source, precision=None)
            nncf = nncf_model(path, fit, args.nncf_python, out, t["nncf_type"])
            if isinstance(nncf, str):
                notes["nncf"] = nncf
            else:
                runners["nncf"] = _OV(nncf)
            batches = [int(b) for b in args.batches.split(",")]

            def batch_feeds(batch):
                if t["labels"] is not None:  # images: real ones, at the batch size
                    return {k: np.concatenate([h[k] for h in held])[:batch] for k in held[0]}
                return graphopt.feeds.make_inputs(source, dims={"batch": batch, "seq": 128})

            # graphopt is optimized for each batch size, as a user deploying at it would: the
            # lowering and the int8 gains are measured at that shape.
            per_batch = {b: {} for b in batches}
            chosen = {}
            for bound in BOUNDS:
                for label, kw in ((f"graphopt int8 {bound}", {"precision": "int8", "target": "ort-cpu"}),
                                  (f"graphopt cpu {bound}", {"precision": "auto", "target": "cpu"})):
                    for batch in batches:
                        result = graphopt.optimize(source, inputs=batch_feeds(batch), calib=fit, fidelity=bound, **kw)
                        per_batch[batch][label] = runner(result.model)
                        sel = result.report.fidelity["selection"]
                        lowering = result.report.lowering
                        chosen.setdefault(label, {})[f"b{batch}"] = (
                            f"{sel['int8_layers']}/{sel['layers_total']} int8, "
                            f"{lowering.get('chosen') if 'candidates' in lowering else 'onnxruntime'}")
            reference = [runners["ort-fp32"].run(b) for b in held]
            every = {k: [(None, r)] for k, r in runners.items()}
            for batch in batches:
                for label, r in per_batch[batch].items():
                    every.setdefault(label, []).append((batch, r))
            entry = {"fidelity": {}, "chosen": chosen, "notes": notes, "latency_ms": {}}
            for k, made in every.items():  # a graphopt row: the worse of its per-batch models
                scores = []
                for _, r in made:
                    got = [r.run(b) for b in held]
                    c = cosines(reference, got)
                    score = {"mean": round(float(c.mean()), 5), "min": round(float(c.min()), 5)}
                    if t["labels"] is not None:  # digits: accuracy and top-1 agreement with fp32
                        top1 = np.concatenate([next(iter(o.values())).argmax(-1) for o in got])
                        ref1 = np.concatenate([next(iter(o.values())).argmax(-1) for o in reference])
                        score["accuracy"] = round(float((top1 == t["labels"]).mean()), 4)
                        score["agreement"] = round(float((top1 == ref1).mean()), 4)
                    scores.append(score)
                entry["fidelity"][k] = min(scores, key=lambda sc: (sc.get("agreement", 1), sc["mean"]))
            names = [*runners, *per_batch[batches[0]]]
            for batch in batches:
                feeds = batch_feeds(batch)
                at = {**runners, **per_batch[batch]}
                medians = timing.medians(timing.interleaved({k: (lambda r=r: r.run(feeds)) for k, r in at.items()},
                                                            rounds=args.rounds, warmup=2))
                entry["latency_ms"][f"b{batch}"] = {k: round(v * 1e3, 2) for k, v in medians.items()}
            results["models"][name] = entry
            print(f"\n{name}: fidelity on {sum(len(next(iter(b.values()))) for b in held)} held-out rows; {chosen}; {notes}")
            base = {b: entry["latency_ms"][b]["ort-fp32"] for b in entry["latency_ms"]}
            for k in names:
                lat = "  ".join(f"{b} {entry['latency_ms'][b][k]:8.2f} ms ({base[b] / entry['latency_ms'][b][k]:4.2f}x)"
                                for b in entry["latency_ms"])
                f = entry["fidelity"][k]
                task_metric = f"  accuracy {f['accuracy']:.4f} agreement {f['agreement']:.4f}" if "accuracy" in f else ""
                print(f"  {k:22s} {lat}  cosine mean {f['mean']:.5f} min {f['min']:.5f}{task_metric}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
