"""Mixers at long context (issue 17, item 4): perplexity and latency of a char-level LM with
every attention layer swapped, at the lengths where mixers pay.

The model: GPT-2 shape (4 layers, hidden 128, 4 heads, byte vocabulary, 2048 positions) trained
here on Python's standard-library sources by `--train` (default: 1500 steps of 16 x 256 tokens,
then 300 steps of 4 x 1024 tokens: the model is trained at 1024 tokens of context; seeded and by
step count, so every run trains the same model, and cached in ~/.cache/graphopt, about 20 min
on 2 idle cores). Mixers are calibrated on training text at 1024 tokens; windows (window,
hybrid) are capped at 1/8 of that length (`--max-window`, 128). Perplexity: held-out stdlib text
the model and the calibration never saw, at each length; the held-out half of the calibration
text makes the mixers' own choices. Latency: batch 1, medians over rounds, twice: sessions whose
threads sleep after each run, every model interleaved call by call; and plain sessions (threads
spin, onnxruntime's default: what a user gets), each model in blocks of 3 consecutive calls.

    .venv/bin/python benchmarks/long_context.py [--train 1500x256x16,300x1024x4] [--lengths 1024,2048]
        [--mixers hybrid,linear:hedgehog,...] [--features 1] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import graphopt
from graphopt.sessions import session_for
from graphopt import machine, timing
from graphopt.passes.mixers import MIXERS, swap_mixers

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import task_mixers  # noqa: E402  (the char-LM task's export wrapper)

CALIB_LENGTH = 1024
TRAIN = "1500x256x16,300x1024x4"  # steps x length x batch: short windows first, the full context last


def corpus() -> tuple[np.ndarray, np.ndarray]:
    """(train, test) bytes: the standard library's top-level modules, the last tenth held out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py")))
    data = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    split = int(len(data) * 0.9)
    return data[:split], data[split:]


def cache_dir() -> Path:
    """Where trained models are kept between runs: $XDG_CACHE_HOME/graphopt (~/.cache/graphopt)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphopt"


def parse_schedule(text: str) -> list[tuple[int, int, int]]:
    """"1500x256x16,200x1024x4" -> [(steps, length, batch), ...]: the training phases in order."""
    try:
        phases = [tuple(int(n) for n in part.split("x")) for part in text.split(",")]
    except ValueError:
        phases = []
    if not phases or any(len(p) != 3 or min(p) < 1 for p in phases):
        raise SystemExit(f"--train '{text}': give phases as STEPSxLENGTHxBATCH, comma-separated (e.g. 1500x256x16,200x1024x4)")
    return phases


def train(data: np.ndarray, schedule: str, cache: bool = True):
    """The seeded char-LM trained by `schedule` (phases of steps x length x batch, one learning-rate
    cycle over all of them); (model, seconds, last loss). Short windows first make most steps
    cheap (attention is quadratic in the window); the last phase trains at the full context.
    Each window starts at a random position offset, so every one of the 2048 positions is
    trained (the model reads at most the last phase's length back). No dropout: the model is
    trained far short of convergence. With `cache`, a model trained before with the same
    schedule is loaded instead."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    phases = parse_schedule(schedule)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=2048, n_embd=128, n_layer=4, n_head=4, bos_token_id=0,
                        eos_token_id=0, attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    kept = cache_dir() / f"charlm-{schedule.replace(',', '+')}-seed0-torch{torch.__version__.split('+')[0]}.pt"
    if cache and kept.exists():
        saved = torch.load(kept)
        model.load_state_dict(saved["state"])
        return model.eval(), saved["seconds"], saved["loss"]
    total = sum(steps for steps, _, _ in phases)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=total, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    tensor = torch.as_tensor(data)
    start, done = time.perf_counter(), 0
    for steps, length, batch in phases:
        for _ in range(steps):
            starts = torch.randint(0, len(tensor) - length - 1, (batch,), generator=g)
            x = torch.stack([tensor[s:s + length + 1] for s in starts])
            offsets = torch.randint(0, config.n_positions - length + 1, (batch, 1), generator=g)
            logits = model(x[:, :-1], position_ids=offsets + torch.arange(length)).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done % 100 == 0:
                print(f"  training step {done}/{total} ({length} x {batch}): loss {float(loss.detach()):.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    seconds, last = time.perf_counter() - start, float(loss.detach())
    if cache:
        kept.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "seconds": seconds, "loss": last}, kept)
    return model.eval(), seconds, last


def windows(data: np.ndarray, length: int, count: int, offset: int = 0) -> np.ndarray:
    return np.stack([data[offset + i * length: offset + (i + 1) * length + 1] for i in range(count)])


def perplexity(model: graphopt.Model, text: np.ndarray) -> float:
    """exp(mean next-byte NLL) over the windows of `text` [N, L + 1], one window per run."""
    nll, count = 0.0, 0
    for w in text:
        logits = graphopt.verify.run(model, {"x": w[None, :-1]})["logits"][0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= np.take_along_axis(logp, w[1:, None], -1).sum()
        count += len(w) - 1
    return math.exp(nll / count)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default=TRAIN, help="training phases, STEPSxLENGTHxBATCH comma-separated (default %(default)s)")
    ap.add_argument("--no-cache", action="store_true", help="train even if a model with these settings is cached")
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--mixers", default=",".join(MIXERS))
    ap.add_argument("--max-window", type=int, default=CALIB_LENGTH // 8)
    ap.add_argument("--features", type=int, default=1, help="the Hedgehog map's width in head sizes (hedgehog, hybrid)")
    ap.add_argument("--steps", type=int, default=300, help="calibration steps per layer")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--save", help="directory to keep the original and swapped models in (ONNX), to time or inspect later")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    print(machine.line(), flush=True)  # the machines differ from day to day: name the CPU
    lengths = [int(n) for n in args.lengths.split(",")]
    train_data, test_data = corpus()
    module, seconds, loss = train(train_data, args.train, cache=not args.no_cache)
    print(f"trained {args.train} (steps x length x batch) in {seconds:.0f} s "
          f"(last loss {loss:.3f})", flush=True)

    example = torch.as_tensor(train_data[: 2 * 256].reshape(2, 256))
    model = task_mixers._named_logits(graphopt.load(task_mixers.Logits(module, "logits"), example_inputs=(example,),
                                                    dynamic_shapes=({0: "batch", 1: "seq"},)))
    calib_text = windows(train_data, CALIB_LENGTH, 8, offset=len(train_data) // 3)
    calib = [{"x": w[None, :-1]} for w in calib_text]
    exact = graphopt.optimize(model, inputs=calib[0]).model
    tests = {n: windows(test_data, n, max(1, 8192 // n)) for n in lengths}
    results: dict = {"machine": machine.describe(), "train": {"schedule": args.train, "seconds": round(seconds, 1),
                                                              "last_loss": round(loss, 4)}}
    models = {"original": exact}
    results["original"] = {"perplexity": {n: perplexity(exact, t) for n, t in tests.items()}}
    print("original", results["original"], flush=True)
    for mixer in args.mixers.split(","):
        start = time.perf_counter()
        wide = args.features if mixer in ("linear:hedgehog", "hybrid") else 1
        mixed = swap_mixers(exact, mixer, calib=calib, layers="all", steps=args.steps, max_window=args.max_window, features=wide,
                            seq=max(lengths))
        fit = time.perf_counter() - start
        models[mixer] = mixed.model
        report = mixed.report
        results[mixer] = {"perplexity": {n: perplexity(mixed.model, t) for n, t in tests.items()},
                          "calibration_seconds": round(fit, 1),
                          "fit_seconds_per_layer": report["calibration"]["fit_seconds_per_layer"],
                          "windows": [e.get("window") for e in report["per_layer"]],
                          "as": [e.get("as") for e in report["per_layer"]],
                          "correction_kept": (report.get("correction") or {}).get("kept")}
        print(mixer, results[mixer], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(args.save or tmp)
        where.mkdir(parents=True, exist_ok=True)
        paths = {k: str(graphopt.save(m, where / f"{k.replace(':', '_')}.onnx")) for k, m in models.items()}
        # quiet: threads sleep after each run, models interleaved call by call; plain: a default
        # session (threads spin), each model timed in blocks of consecutive calls
        for mode, spinning, block in (("seconds", False, 1), ("seconds_plain", True, 3)):
            sessions = {k: session_for(p, disabled=(), spinning=spinning) for k, p in paths.items()}
            for n in lengths:
                feeds = {"x": test_data[None, :n]}
                runs = {k: (lambda s=s: s.run(feeds)) for k, s in sessions.items()}
                for k, t in timing.medians(timing.interleaved(runs, rounds=args.rounds, warmup=1, block=block)).items():
                    results[k].setdefault(mode, {})[n] = round(t, 4)
            del sessions
    base = results["original"]
    print("\n| model | " + " | ".join(f"ppl @{n} (x orig) | s @{n} (speed-up) | plain session s @{n}" for n in lengths) + " |")
    print("|---|" + "---|---|---|" * len(lengths))
    for k in models:
        r = results[k]
        cells = []
        for n in lengths:
            cells.append(f"{r['perplexity'][n]:.3f} ({r['perplexity'][n] / base['perplexity'][n]:.3f})")
            for mode in ("seconds", "seconds_plain"):
                cells.append(f"{r[mode][n]:.3f} ({base[mode][n] / r[mode][n]:.2f}x)")
        print(f"| {k} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
