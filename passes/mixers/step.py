"""The mixer swap as an approximate step: calibrate, fit, select, swap, measure.

    result = swap_mixers(model, "linear:hedgehog", calib="calib.npz", layers="auto", fidelity=0.99)

1. Calibration data (graphopt/calibration.py): the user's, split into fit and held-out
   batches, or, with a loud warning, generated inputs.
2. Capture: the model runs in onnxruntime with every canonical attention op's Q, K^T, V, bias
   and output exposed.
3. Fit: per layer, the kind's parameters (Hedgehog maps, windows, mixing factors, conv
   kernels) against the captured softmax output (attention transfer, torch, `steps` steps).
4. Select: `layers` = "all", indices, "best:N" or "auto": layers ranked by the end-to-end
   held-out cosine of the model with that layer alone swapped, swapped greedily (auto) while
   the end-to-end cosine stays >= `fidelity`.
5. Correct (correct.py): each swapped layer's output projection refitted against the
   original's output, kept if neither the held-out end-to-end mean cosine nor the worst
   row's falls.
6. Report: per layer relative error and cosine on held-out data; end to end: output cosine,
   max error, KL divergence for logit outputs; what was kept and why.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphopt import calibration, registry, summary, verify
from graphopt.fidelity import worst_mean_cosine, worst_min_cosine
from graphopt.errors import InputError
from graphopt.ir import ir
from graphopt.model import Model
from graphopt.passes.mixers import correct, linear, spec as specs, state
from graphopt.passes.mixers.edit import RULE
from graphopt.passes.mixers.swap_error import Measure, layer_error
from graphopt.shapes import infer_shapes
from graphopt import details
from graphopt.details import Details, Table
from graphopt.steps import ApproximateStep, Approximation, Options, StepOption

Feeds = Mapping[str, np.ndarray]


@dataclasses.dataclass
class MixResult:
    model: Model
    report: dict[str, Any]
    convert: Callable[[Feeds], dict[str, np.ndarray]] | None = None  # original feeds -> the swapped model's
    uncorrected: Model | None = None  # the swap before the output-side correction (None: no correction ran)

    def feeds_for(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """The swapped model's inputs for the original's `feeds`: the same, except that where a
        KV cache became a state, the state of the fed past replaces it."""
        return dict(feeds) if self.convert is None else self.convert(feeds)


def swap(model: ir.Model, node: ir.Node, spec: specs.MixerSpec, weights=None, *, quadratic: bool = False,
         layer: int | None = None) -> str:
    """Replace one canonical attention op by `spec`'s mixer; returns what was done. `weights`:
    what the kind's fit returned. A causal linear mixer on a layer that reads a KV cache
    carries a state instead (named after `layer`)."""
    return specs.kind_of(spec).swap(model, node, spec, weights, quadratic=quadratic, layer=layer)


def capture(model: Model, batches: Sequence[Feeds], nodes: Sequence[ir.Node]) -> list[dict[str, list[np.ndarray]]]:
    """Per canonical op: lists (one entry per batch) of q, kt, v, bias (or None) and y."""
    wanted = [[v.name if v is not None else None for v in (*node.inputs, node.outputs[0])] for node in nodes]
    # Constant inputs (a folded bias, a scale; BEiT's and DeiT's dynamo exports) are read, not run.
    constants = {v.name: np.array(t.numpy()) for node in nodes for v in node.inputs
                 if v is not None and (t := ir.convenience.get_const_tensor(v)) is not None}
    results = calibration.run_exposed(model, [n for row in wanted for n in row if n and n not in constants], batches)
    caps = []
    for row in wanted:
        keys = ("q", "kt", "v", "bias", "y") if len(row) == 5 else ("q", "kt", "v", "y")
        entry = {k: [constants[n] if n in constants else r[n] for r in results] for k, n in zip(keys, row)}
        entry.setdefault("bias", [None] * len(results))
        # a [S, T] (or [H, S, T]) bias broadcasts over batch and heads: captured as [1, 1, S, T]
        entry["bias"] = [b if b is None or b.ndim >= 4 else b.reshape((1,) * (4 - b.ndim) + b.shape) for b in entry["bias"]]
        caps.append(entry)
    return caps


def swap_mixers(model: Model, mixer: str, *, calib: Any = None, holdout: Any = None, layers: str | Sequence[int] = "all",
                fidelity: float = 0.99, steps: int = 300, seed: int = 0, dims: Mapping[str, int] | None = None,
                progress: Callable[[int, int, str], None] | None = None, seq: int | None = None,
                correction: bool = True, max_window: int | None = None, features: int = 1,
                reference: Model | None = None) -> MixResult:
    """`layers`: "all", "auto", "best:N" (the N layers whose swap alone moves the output least) or
    indices. `holdout`: explicit held-out batches (else half of `calib` is held out).
    `seq`: the sequence length the model will run at, which picks each linear mixer's
    evaluation order (default: the calibration data's). `correction`: refit each swapped
    layer's output projection against the original's output (correct.py), kept where the
    held-out end-to-end fidelity says so. `max_window`: the largest softmax window (window and
    hybrid mixers) the user allows, in tokens of distance. `features`: the Hedgehog map's width
    in head sizes (linear:hedgehog, hybrid): wider maps fit softmax closer and cost more per token."""
    spec = specs.MixerSpec.parse(mixer).with_options(max_window=max_window, features=features)
    kind = specs.kind_of(spec)
    work = model.clone()
    infer_shapes(work.ir)
    nodes = specs.attention_nodes(work.ir.graph)
    if not nodes:
        raise _no_attention(work)
    data = calibration.split(work, calib, holdout=holdout, seed=seed, dims=dims)
    say = progress or (lambda _done, _total, _what: None)
    say(0, len(nodes), "capturing attention inputs and outputs")
    fit_caps, held_caps = capture(work, data.fit, nodes), capture(work, data.held, nodes)
    per_layer = []
    weights: dict[int, Any] = {}
    for i, node in enumerate(nodes):
        say(i, len(nodes), f"{spec.name}: {'fitting' if kind.fitted(spec) else 'measuring'} layer {i + 1}/{len(nodes)}")
        start = time.perf_counter()
        w = weights[i] = kind.fit(spec, node, i, fit_caps[i], held_caps[i], steps, seed)
        per_layer.append({"index": i, "node": node.name, **layer_error(spec, node, held_caps[i], w),
                          **kind.describe(spec, node, w), "fit_seconds": round(time.perf_counter() - start, 3)})
    for field, values in (kind.scores(work, data.held, nodes) or {}).items():  # e.g. drop's redundancy
        for entry, score in zip(per_layer, values):
            entry[field] = score
    references = [verify.run(reference or work, f) for f in data.held]  # the original's held-out outputs, run once
    measure = Measure(spec, nodes, weights, data.held, held_caps, references)
    seq = seq or calibration.seq_hint(data.held)
    if layers == "auto" or (isinstance(layers, str) and layers.startswith("best:")):
        for i, entry in enumerate(per_layer):  # each layer's end-to-end effect alone ranks it
            say(i, len(nodes), f"{spec.name}: end-to-end effect of layer {i + 1}/{len(nodes)} alone")
            entry["alone_mean_cosine"] = round(worst_mean_cosine(measure(_apply(work, nodes, spec, weights, {i}, seq))), 6)
    chosen, selection_note = _select(work, nodes, spec, weights, per_layer, layers, fidelity, measure, seq)
    done: dict[int, str] = {}
    swapped = _apply(work, nodes, spec, weights, chosen, seq, done)
    end_to_end = measure(swapped)
    corrections = uncorrected = None
    if correction and chosen:
        uncorrected = swapped
        swapped, end_to_end, corrections = _correct(work, swapped, end_to_end, nodes, sorted(chosen), data, fit_caps,
                                                    held_caps, measure, say)
    for entry in per_layer:
        entry["swapped"] = entry["index"] in chosen
        if entry["index"] in done:
            entry["as"] = done[entry["index"]]
        if not entry["swapped"]:
            entry["kept_because"] = selection_note.get(entry["index"], "not selected (--layers)")
    fit_seconds = sum(e["fit_seconds"] for e in per_layer)
    report = {
        "mixer": spec.name, "layers_swapped": sorted(chosen), "layers_total": len(nodes),
        **kind.report_fields(spec),
        "per_layer": per_layer, "end_to_end": end_to_end,
        "calibration": {**data.describe(), "steps": steps if kind.fitted(spec) else 0, "fit_seconds": round(fit_seconds, 2),
                        "fit_seconds_per_layer": round(fit_seconds / len(per_layer), 3)},
        "correction": corrections,
        "selection": {"layers": layers if isinstance(layers, str) else list(layers), "fidelity_threshold": fidelity},
    }
    decode = _decode_report(model, swapped)
    convert = None
    if decode:
        report["decode"] = decode

        def convert(feeds: Feeds) -> dict[str, np.ndarray]:
            single = Measure(spec, nodes, weights, [feeds], capture(work, [feeds], nodes), None)
            return single.feeds(swapped, 0)
    return MixResult(swapped, report, convert, uncorrected)


def _correct(work, swapped, before, nodes, chosen, data, fit_caps, held_caps, measure, say):
    """The output-side correction of the swapped layers, kept if neither the held-out end-to-end
    mean cosine nor the worst row's cosine falls; (model, its end-to-end report, the correction's report)."""
    if [v.name for v in swapped.ir.graph.inputs] != [v.name for v in work.ir.graph.inputs]:
        return swapped, before, {"kept": False, "why": "the swapped model reads decoding states: not corrected"}
    start = time.perf_counter()
    corrected, rows = correct.correct(work, swapped, nodes, chosen, data.fit, data.held, fit_caps, held_caps, say)
    report = {"layers": rows, "seconds": round(time.perf_counter() - start, 2)}
    if not any(r["corrected"] for r in rows):
        return swapped, before, {**report, "kept": False, "why": "no layer's held-out error fell"}
    after = measure(corrected)
    a, b = worst_mean_cosine(after), worst_mean_cosine(before)
    a_min, b_min = worst_min_cosine(after), worst_min_cosine(before)
    kept = a >= b and a_min >= b_min  # the mean may not fall, nor the worst row (a correction can overfit rows)
    report.update(mean_cosine_before=round(b, 6), mean_cosine_after=round(a, 6), min_cosine_before=round(b_min, 6),
                  min_cosine_after=round(a_min, 6), kept=kept)
    return (corrected, after, report) if kept else (swapped, before, report)


def _no_attention(model: Model) -> InputError:
    """Why there is nothing to swap: the model has no attention at all, or its attention is
    still decomposed (fuse-attention did not run, or refused the sites)."""
    found = registry.analysis("attention")(model.ir.graph)
    if not found:
        ops = ", ".join(list(summary.summarize(model)["op_counts"])[:6])
        return InputError("the model has no attention layers: nothing for a token mixer to replace "
                          f"(graphopt inspect finds none; its most frequent ops: {ops})")
    return InputError(f"{len(found)} attention layer(s) found, but none is a canonical attention op",
                      hint="run the exact preset (fuse-attention) first; `graphopt optimize --explain` says why a "
                           "site was not fused")


def _decode_report(original: Model, swapped: Model) -> dict[str, Any] | None:
    """What a decoding loop must feed and read now that KV caches became states."""
    before = {v.name for v in original.ir.graph.inputs} | {v.name for v in original.ir.graph.outputs}
    after_in = [v.name for v in swapped.ir.graph.inputs]
    after_out = [v.name for v in swapped.ir.graph.outputs]
    if not any(n.startswith(state.STATE) for n in after_in):
        return None
    return {
        "state_inputs": [n for n in after_in if n not in before],
        "state_outputs": [n for n in after_out if n not in before],
        "removed": sorted(before - set(after_in) - set(after_out)),
        "how": (f"start with zero states ({state.PAST_LENGTH} 0); after each call feed present_state.i / "
                f"present_normalizer.i back as past_state.i / past_normalizer.i"
                + (f" and add the new tokens to {state.PAST_LENGTH}" if state.PAST_LENGTH in after_in else "")),
    }


def _apply(model: Model, nodes, spec, weights, chosen: set[int], seq: int, done: dict | None = None) -> Model:
    """A copy of `model` with layers `chosen` swapped; `done` collects what each swap did."""
    work = model.clone()
    by_name = {n.name: n for n in specs.attention_nodes(work.ir.graph)}
    for i in sorted(chosen):
        node = by_name[nodes[i].name]
        what = swap(work.ir, node, spec, weights.get(i), quadratic=linear.quadratic(spec, node, seq), layer=i)
        if done is not None:
            done[i] = what
    state.finish(work.ir)
    return work


def _rank_key(entry: dict[str, Any]) -> tuple[float, float]:
    """Most swappable first: the highest end-to-end held-out cosine with the layer swapped
    alone; ties (and rankings without it) by redundancy for drop, else the layer's own error."""
    own = -entry["redundancy"] if entry.get("redundancy") is not None else entry["rel_error"]
    return -entry.get("alone_mean_cosine", 0.0), own


def _select(model, nodes, spec, weights, per_layer, layers, bound, measure, seq):
    if layers == "all":
        return set(range(len(nodes))), {}
    order = sorted(range(len(nodes)), key=lambda i: _rank_key(per_layer[i]))
    if isinstance(layers, str) and layers.startswith("best:"):
        n = int(layers.split(":", 1)[1])
        return set(order[:n]), {i: f"not among the {n} most swappable layers (end-to-end held-out cosine with it swapped alone)"
                                for i in order[n:]}
    if layers != "auto":
        chosen = set(int(i) for i in layers)
        bad = sorted(i for i in chosen if not 0 <= i < len(nodes))
        if bad:
            raise InputError(f"--layers names {bad}, but the model has attention layers 0..{len(nodes) - 1}")
        return chosen, {}
    chosen: set[int] = set()
    notes = {}
    for i in order:
        worst = worst_mean_cosine(measure(_apply(model, nodes, spec, weights, chosen | {i}, seq)))
        if worst >= bound:
            chosen.add(i)
        else:
            notes[i] = f"swapping it too brings the end-to-end mean cosine to {worst:.4f} < {bound}"
    return chosen, notes


class SwapMixers(ApproximateStep):
    """Swap softmax attention layers for a calibrated token mixer."""

    name = "swap-mixers"

    def __init__(self, mixer: str, options: Options) -> None:
        super().__init__(options)
        # an unknown mixer, or options it does not take, fail before any work
        self.spec = specs.MixerSpec.parse(mixer).with_options(max_window=options.max_window, features=options.features)

    def approximate(self, model: Model) -> Approximation:
        o = self.options
        mixed = swap_mixers(model, self.spec.name, calib=o.calib, layers=o.layers, fidelity=o.fidelity, steps=o.calib_steps,
                            seed=o.seed, dims=o.dims, progress=o.progress, max_window=o.max_window,
                            features=o.features, reference=o.budget.reference if o.budget is not None else None)
        return Approximation(mixed.model, {RULE: len(mixed.report["layers_swapped"])}, mixed.report,
                             mixed.convert and mixed.feeds_for)

    def details(self, report: dict[str, Any]) -> Details:
        """Every attention layer (swapped or kept, and why), end to end, the decoding states."""
        layers = [{**e, "note": e.get("kept_because", e.get("as", ""))} for e in report["per_layer"]]
        table = Table(f"fidelity: {report['mixer']} on {len(report['layers_swapped'])}/{report['layers_total']} attention "
                      f"layers (held-out rows: {report['calibration']['held_out_rows']})",
                      details.columns(("index", "layer"), ("node", "node"), ("swapped", "swapped"),
                                      ("rel_error", "rel error", ".4f"), ("cosine", "cosine", ".4f"), ("note", "note")),
                      layers, chart="rel_error", unit="relative error")
        lines = details.end_to_end_lines(report["end_to_end"])
        if "decode" in report:
            decode = report["decode"]
            lines.append(f"decoding: KV caches {', '.join(decode['removed'])} replaced by states "
                         f"{', '.join(decode['state_inputs'])} -> {', '.join(decode['state_outputs'])}; {decode['how']}")
        return Details([table], dict(report["end_to_end"]), self.options.fidelity, lines,
                       details.calibration_warnings(report))


def _layers(text) -> str | list[int]:
    """--layers: all | auto | best:N | comma-separated indices."""
    if not isinstance(text, str) or text in ("all", "auto") or text.startswith("best:"):
        return text
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--layers wants all, auto or indices like 0,2,4; got '{text}'") from None


OPTIONS = (
    StepOption("layers", "all", "with --preset mixers: all | auto | best:N | comma-separated layer indices", parse=_layers),
    StepOption("calib_steps", 300, "optimizer steps per layer when fitting a mixer", parse=int),
    StepOption("max_window", None, "with --mixer window or hybrid: the largest softmax window (tokens of distance) "
               "the mixer may keep", parse=int),
    StepOption("features", 1, "with --mixer linear:hedgehog or hybrid: the Hedgehog map's width in head sizes "
               "(2 x features x D features): wider fits softmax closer, at more cost per token", parse=int),
)
registry.register_approximate("mixer", SwapMixers, choices=specs.names, options=OPTIONS)
