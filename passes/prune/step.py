"""The `prune` approximate step: fewer FFN neurons, under the fidelity bound.

1. Capture every FFN site's activation on the calibration rows (fit and held-out halves).
2. Uniform pass: keep the same fraction of neurons in every block, from KEEP (most kept first),
   each block refitted (neurons.refit); the smallest fraction whose held-out end-to-end worst
   mean cosine meets the bound wins.
3. Per-block pass: from there, blocks go one KEEP step further one at a time, the block whose
   next step has the lowest held-out layer error first, each kept only if the bound still
   holds (at most MAX_TRIALS end-to-end measurements in all).
The model is written with smaller matrices, so every runtime runs less work; the report gives
each block's kept width, its held-out error with and without the refit, the linear FLOPs per
token before and after, and every trial.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from graphopt import calibration, fidelity, registry, verify
from graphopt.details import Details, Table, calibration_warnings, columns, end_to_end_lines
from graphopt.errors import InputError
from graphopt.model import Model
from graphopt.passes._weights import const_array
from graphopt.passes.prune import neurons
from graphopt.passes.prune.sites import find_ffn
from graphopt.shapes import infer_shapes
from graphopt.steps import ApproximateStep, Approximation, Options

KEEP = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25)  # fractions of each block's neurons kept, in trial order
MAX_TRIALS = 24
RULE = "PruneFfnNeurons"
FORMS = ("ffn",)


def linear_flops(model: Model) -> int:
    """Multiply-adds x 2 per token of the MatMul / Gemm layers with constant weights."""
    total = 0
    for node in model.ir.graph:
        if node.domain == "" and node.op_type in ("MatMul", "Gemm") and len(node.inputs) >= 2:
            w = const_array(node.inputs[1])
            if w is not None and w.ndim == 2:
                total += 2 * w.shape[0] * w.shape[1]
    return total


def prune(model: Model, options: Options) -> tuple[Model, dict[str, Any]]:
    work = model.clone()
    infer_shapes(work.ir)
    sites, refused = find_ffn(work.ir.graph)
    if not sites:
        why = "; ".join(f"'{k}': {v}" for k, v in refused.items()) or "no MatMul -> activation -> MatMul block"
        raise InputError(f"--prune ffn found no feed-forward block to prune ({why})",
                         hint="the FFN must be MatMul (+ bias) -> elementwise activation -> MatMul with constant weights")
    data = calibration.split(work, options.calib, seed=options.seed, dims=options.dims)
    names = [s.hidden.name for s in sites]
    fit_caps = calibration.run_exposed(work, names, data.fit)
    held_caps = calibration.run_exposed(work, names, data.held)
    fit_masks, held_masks = neurons.token_masks(data.fit), neurons.token_masks(data.held)  # padded tokens left out
    h_fit = [neurons.rows([c[n] for c in fit_caps], fit_masks) for n in names]
    h_held = [neurons.rows([c[n] for c in held_caps], held_masks) for n in names]
    # removal order per block (OBS on the refit), as far as the smallest KEEP fraction goes
    removed = [neurons.removal_order(h, s.w2, s.width - max(1, int(round(KEEP[-1] * s.width)))) for h, s in zip(h_fit, sites)]
    references = [verify.run(work, f) for f in data.held]
    fits: dict[tuple[int, int], neurons.Refit] = {}

    def fit(i: int, step: int) -> neurons.Refit:
        if (i, step) not in fits:
            k = max(1, int(round(KEEP[step] * sites[i].width)))
            gone = removed[i][:sites[i].width - k]
            keep = np.setdiff1d(np.arange(sites[i].width), gone)
            fits[(i, step)] = neurons.refit(h_fit[i], h_held[i], sites[i].w2, keep)
        return fits[(i, step)]

    def build(steps: Mapping[int, int]) -> Model:
        trial = work.clone()
        trial_sites, _ = find_ffn(trial.ir.graph)
        for i, step in steps.items():
            if step >= 0:
                neurons.apply(trial.ir.graph, trial_sites[i], fit(i, step))
        return trial

    trials: list[dict[str, Any]] = []
    bound = options.fidelity

    def measure(steps: Mapping[int, int], what: str) -> tuple[Model, dict[str, Any], bool]:
        trial = build(steps)
        e2e = fidelity.end_to_end(references, trial, data.held)
        ok = fidelity.worst_mean_cosine(e2e) >= bound
        trials.append({"trial": what, "mean_cosine": fidelity.worst_mean_cosine(e2e), "within_bound": ok})
        return trial, e2e, ok

    say = options.progress or (lambda _done, _total, _what: None)
    chosen: dict[int, int] = {i: -1 for i in range(len(sites))}
    best_model, best_e2e = work, fidelity.end_to_end(references, work, data.held)
    for step in range(len(KEEP)):  # uniform
        say(step, len(KEEP), f"prune: keeping {KEEP[step]:.0%} of every FFN block")
        steps = {i: step for i in range(len(sites))}
        trial, e2e, ok = measure(steps, f"every block at {KEEP[step]:.3f}")
        if not ok:
            break
        chosen, best_model, best_e2e = steps, trial, e2e
    while len(trials) < MAX_TRIALS:  # per block, cheapest next step first
        nxt = [(fit(i, s + 1).held_error, i) for i, s in chosen.items() if s + 1 < len(KEEP)]
        if not nxt:
            break
        improved = False
        for _, i in sorted(nxt):
            if len(trials) >= MAX_TRIALS:
                break
            steps = {**chosen, i: chosen[i] + 1}
            say(len(trials), MAX_TRIALS, f"prune: block {i} to {KEEP[steps[i]]:.0%}")
            trial, e2e, ok = measure(steps, f"block {i} at {KEEP[steps[i]]:.3f}")
            if ok:
                chosen, best_model, best_e2e, improved = steps, trial, e2e, True
        if not improved:
            break
    per_layer = []
    for i, site in enumerate(sites):
        step = chosen[i]
        f = fit(i, step) if step >= 0 else None
        per_layer.append({"index": i, "node": site.name, "width": site.width,
                          "kept": site.width if f is None else len(f.keep),
                          "held_error": None if f is None else round(f.held_error, 6),
                          "held_error_unrefitted": None if f is None else round(f.held_error_unrefitted, 6),
                          "ridge": None if f is None else f.ridge})
    before, after = linear_flops(work), linear_flops(best_model)
    report = {"prune": "ffn", "blocks": len(sites), "blocks_pruned": sum(1 for s in chosen.values() if s >= 0),
              "per_layer": per_layer, "refused": refused, "calibration": data.describe(), "end_to_end": best_e2e,
              "linear_flops_per_token": {"before": before, "after": after,
                                          "removed_fraction": round(1 - after / before, 4) if before else 0.0},
              "trials": trials, "fidelity_bound": bound}
    return best_model, report


class PruneFfn(ApproximateStep):
    """Structured pruning of FFN neurons with a least-squares refit of each down projection."""

    name = "prune-ffn"

    def approximate(self, model: Model) -> Approximation:
        pruned, report = prune(model, self.options)
        removed = sum(e["width"] - e["kept"] for e in report["per_layer"])
        return Approximation(pruned, {RULE: removed}, report)

    def details(self, report: dict[str, Any]) -> Details:
        flops = report["linear_flops_per_token"]
        table = Table(f"prune: FFN neurons in {report['blocks_pruned']}/{report['blocks']} blocks "
                      f"(held-out rows: {report['calibration']['held_out_rows']})",
                      columns(("index", "block"), ("node", "node"), ("width", "width"), ("kept", "kept"),
                              ("held_error_unrefitted", "rel error, no refit", ".4f"), ("held_error", "rel error, refitted", ".4f")),
                      report["per_layer"], chart="held_error", unit="relative error")
        lines = [f"linear FLOPs per token: {flops['before']:,} -> {flops['after']:,} "
                 f"({flops['removed_fraction']:.1%} removed)", *end_to_end_lines(report["end_to_end"]),
                 f"{len(report['trials'])} end-to-end trials against the bound {report['fidelity_bound']}"]
        lines += [f"not a prunable block: '{k}': {v}" for k, v in report["refused"].items()]
        return Details([table], dict(report["end_to_end"]), self.options.fidelity, lines, calibration_warnings(report))


def _step(value: str, options: Options):
    if value not in FORMS:
        raise InputError(f"unknown pruning form '{value}'", hint=f"choose from {', '.join(FORMS)}")
    return PruneFfn(options)


registry.register_approximate("prune", _step, choices=lambda: FORMS)
