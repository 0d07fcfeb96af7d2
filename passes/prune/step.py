"""The `prune` approximate step: fewer FFN neurons and attention heads, and dropped blocks,
under the fidelity bound.

Forms (FORMS): `ffn` neurons, attention `heads`, whole `blocks` (an FFN or attention block
whose output becomes a constant, the residual passing through), or several (`ffn+heads`,
`all`). Every site is one block; its units (neurons, heads) are ranked and its output
projection refitted by `neurons`, whatever the form.
1. Capture every site's rows (what its output projection reads) on the calibration data.
2. Rank: each block's ladder is the distinct unit counts KEEP's fractions give it, then 0 (the
   block dropped) where the form allows and the block can be. Every rung gets a proxy error,
   the block's squared output error after the refit (read off the OBS costs) over the energy
   of the residual stream it joins. The proxy ranks a block's rungs; across blocks it is
   scaled by the block's measured sensitivity (the held-out end-to-end loss, 1 - worst mean
   cosine, of that block alone at the rung keeping about PROBE of its units, over its proxy
   there: one trial per block), and all rungs of all blocks are sorted by that estimated loss
   per linear FLOP saved.
3. Bisection: the longest prefix of that order whose held-out end-to-end worst mean cosine
   meets the bound (each block refitted, neurons.refit), about log2(rungs) trials.
4. Refinement: the rungs after it, one at a time in the same order, each kept only if the
   bound still holds; a block whose rung fails is not tried again (at most MAX_TRIALS
   end-to-end measurements in all).
The model is written with smaller matrices, so every runtime runs less work; the report gives
each block's kept units, its held-out error with and without the refit, the linear FLOPs per
token before and after, and every trial.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from graphopt import calibration, fidelity, registry, verify
from graphopt.details import Details, Table, calibration_warnings, columns, end_to_end_lines
from graphopt.errors import InputError
from graphopt.ir import common_passes
from graphopt.model import Model
from graphopt.passes._weights import const_array
from graphopt.passes.prune import neurons
from graphopt.passes.prune.heads import find_heads
from graphopt.passes.prune.sites import find_ffn
from graphopt.shapes import infer_shapes
from graphopt.steps import ApproximateStep, Approximation, Options

KEEP = tuple(1 - k / 16 for k in range(1, 13))  # fractions of each block's units kept, in trial order (15/16 .. 1/4)
DROPPED = 0  # the last rung where blocks may be dropped: no unit kept
MAX_TRIALS = 40  # of the search (bisection and refinement); the sensitivity probes are one per block on top
PROBE = 0.5  # the share of its units a block keeps when its sensitivity is probed
RULES = {"ffn": "PruneFfnNeurons", "heads": "PruneAttentionHeads", "blocks": "DropBlocks"}
FORMS = {"ffn": ("ffn",), "heads": ("heads",), "blocks": ("blocks",), "ffn+heads": ("ffn", "heads"),
         "all": ("ffn", "heads", "blocks")}
WHAT = {"ffn": "FFN neurons", "heads": "attention heads", "blocks": "whole blocks"}


def linear_flops(model: Model) -> int:
    """Multiply-adds x 2 per token of the MatMul / Gemm layers with constant weights."""
    total = 0
    for node in model.ir.graph:
        if node.domain == "" and node.op_type in ("MatMul", "Gemm") and len(node.inputs) >= 2:
            w = const_array(node.inputs[1])
            if w is not None and w.ndim == 2:
                total += 2 * w.shape[0] * w.shape[1]
    return total


def find_sites(graph, forms: tuple[str, ...]) -> tuple[list, dict[str, str]]:
    """The blocks the forms can prune, in graph order, and {node: why not} for the others."""
    sites, refused = [], {}
    if {"ffn", "blocks"} & set(forms):
        found, why = find_ffn(graph)
        sites += found
        refused |= why
    if {"heads", "blocks"} & set(forms):
        found, why = find_heads(graph)
        sites += found
        refused |= {k: f"attention heads: {v}" for k, v in why.items()}
    position = {id(n): i for i, n in enumerate(graph)}
    return sorted(sites, key=lambda s: position[id(s.down)]), refused


def ladder(site, forms: tuple[str, ...]) -> tuple[int, ...]:
    """The unit counts a block may keep, in trial order: KEEP's fractions of its units (distinct,
    at least 1), then 0 where the form drops blocks and this one can be."""
    shrink = sorted({kept(site, f) for f in KEEP} - {site.units}, reverse=True) if site.form in forms else []
    drop = [DROPPED] if "blocks" in forms and neurons.drop_blocker(site) is None else []
    return tuple(shrink + drop)


def rank(proxies: list[list[float]], sensitivity: list[float], savings: list[list[int]]) -> list[tuple[float, int, int]]:
    """Every rung (block i, step) as (key, i, step), cheapest first: the key is the estimated
    end-to-end loss the rung adds (its rise in proxy error x the block's sensitivity) per linear
    FLOP it saves against the rung before (`savings`); a block's keys are made non-decreasing,
    so its rungs come in order."""
    rungs = []
    for i, (proxy, scale) in enumerate(zip(proxies, sensitivity)):
        key = 0.0
        for step in range(len(proxy)):
            rise = scale * (proxy[step] - (proxy[step - 1] if step else 0.0))
            key = max(key, rise / savings[i][step])
            rungs.append((key, i, step))
    return sorted(rungs)


def probe_rung(ladder: tuple[int, ...], units: int) -> int:
    """The rung a block's sensitivity is measured at: the one keeping closest to PROBE of its
    units (a dropped block only when it has no other)."""
    shrink = [j for j, k in enumerate(ladder) if k != DROPPED] or [len(ladder) - 1]
    return min(shrink, key=lambda j: abs(ladder[j] - PROBE * units))


def kept(site, fraction: float) -> int:
    return max(1, int(round(fraction * site.units)))


def prune(model: Model, options: Options, form: str) -> tuple[Model, dict[str, Any]]:
    forms = FORMS[form]
    work = model.clone()
    infer_shapes(work.ir)
    found, refused = find_sites(work.ir.graph, forms)
    ladders = [ladder(s, forms) for s in found]
    refused |= {s.name: f"block: {neurons.drop_blocker(s)}" for s, steps in zip(found, ladders) if not steps}
    where = [i for i, lad in enumerate(ladders) if lad]  # sites[i] is found[where[i]] (in a clone too)
    sites, ladders = [found[i] for i in where], [ladders[i] for i in where]
    if not sites:
        why = "; ".join(f"'{k}': {v}" for k, v in refused.items()) or "no MatMul -> activation -> MatMul block or attention op"
        raise InputError(f"--prune {form} found nothing to prune ({why})",
                         hint="FFN blocks are MatMul (+ bias) -> elementwise activation -> MatMul with constant weights; "
                              "heads need the attention fused (the exact preset) with projections of constant weights")
    data = calibration.split(work, options.calib, seed=options.seed, dims=options.dims)
    names = [s.rows.name for s in sites]
    streams = [neurons.residual_add(s) for s in sites]
    stream_names = [a.outputs[0].name for a in streams if a is not None]
    # streamed, at most --calib-rows rows of each value held (padded tokens left out)
    fit_rows = calibration.sample_rows(work, names + stream_names, data.fit, capacity=options.calib_rows, masked=True,
                                       seed=options.seed, progress=options.progress)
    held_rows = calibration.sample_rows(work, names, data.held, capacity=options.calib_rows, masked=True,
                                        seed=options.seed + 1)
    h_fit = [fit_rows[n].rows.astype(np.float64) for n in names]
    h_held = [held_rows[n].rows.astype(np.float64) for n in names]
    # removal order per block (OBS on the refit), as far as its smallest non-zero fraction goes
    smallest = [min((k for k in lad if k != DROPPED), default=None) for lad in ladders]
    orders = [neurons.removal_order(h, s.w2, s.units - k, group=s.group) if k is not None else (np.zeros(0, np.int64), np.zeros(0))
              for h, s, k in zip(h_fit, sites, smallest)]
    removed = [order for order, _ in orders]
    # the ranking's proxy per rung: the block's squared output error per row (from the OBS
    # costs; a dropped block's is its output's variance), over the energy per row of the
    # residual stream it is added to (of its own output where there is none)
    proxies = []
    for i, site in enumerate(sites):
        target = h_fit[i] @ site.w2.astype(np.float64)
        stream = streams[i]
        energy = float(np.mean(np.sum(fit_rows[stream.outputs[0].name].rows.astype(np.float64) ** 2, axis=1))
                       if stream is not None else np.mean(np.sum(target ** 2, axis=1))) or 1.0
        errors = orders[i][1] / len(target)
        spread = float(np.mean(np.sum((target - target.mean(axis=0)) ** 2, axis=1)))
        proxies.append([(spread if k == DROPPED else float(errors[site.units - k - 1])) / energy for k in ladders[i]])
    references = [verify.run(options.reference_for(work), f) for f in data.held]
    fits: dict[tuple[int, int], neurons.Refit] = {}

    def fit(i: int, step: int) -> neurons.Refit:
        if (i, step) not in fits:
            site, k = sites[i], ladders[i][step]
            keep = np.setdiff1d(np.arange(site.units), removed[i][:site.units - k]) if k else np.zeros(0, np.int64)
            fits[(i, step)] = neurons.refit(h_fit[i], h_held[i], site.w2, keep, group=site.group)
        return fits[(i, step)]

    def build(steps: Mapping[int, int]) -> Model:
        trial = work.clone()
        trial_sites, _ = find_sites(trial.ir.graph, forms)
        for i, step in steps.items():
            if step >= 0:
                neurons.apply(trial.ir.graph, trial_sites[where[i]], fit(i, step))
        common_passes.RemoveUnusedNodesPass()(trial.ir)
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
    # each block's sensitivity: the end-to-end loss (1 - worst mean cosine) of that block alone
    # at its probe rung, over the proxy there; the proxy ranks rungs within a block, the
    # sensitivity scales it to what the output sees (a late block's error reaches it unnormed)
    sensitivity = []
    for i, site in enumerate(sites):
        step = probe_rung(ladders[i], site.units)
        say(i, len(sites), f"prune: sensitivity of block {i} ({site.form})")
        _, e2e, _ = measure({i: step}, f"sensitivity: block {i} ({site.form}) alone at {ladders[i][step]}/{site.units}")
        loss = max(1.0 - fidelity.worst_mean_cosine(e2e), 1e-12)
        sensitivity.append(loss / max(proxies[i][step], 1e-12))
    savings = [[max(1, ((site.units if step == 0 else lad[step - 1]) - lad[step]) * site.unit_flops)
                for step in range(len(lad))] for site, lad in zip(sites, ladders)]
    rungs = rank(proxies, sensitivity, savings)

    def prefix(n: int) -> dict[int, int]:
        steps = {i: -1 for i in range(len(sites))}
        for _, i, step in rungs[:n]:
            steps[i] = step
        return steps

    probes = len(trials)
    best_model, best_e2e = work, fidelity.end_to_end(references, work, data.held)
    low, high = 0, len(rungs)  # the longest prefix within the bound, by bisection
    while low < high:
        mid = (low + high + 1) // 2
        say(len(trials) - probes, MAX_TRIALS, f"prune: the {mid} cheapest of {len(rungs)} steps")
        trial, e2e, ok = measure(prefix(mid), f"the {mid} cheapest steps")
        if ok:
            low, best_model, best_e2e = mid, trial, e2e
        else:
            high = mid - 1
    chosen = prefix(low)
    frozen: set[int] = set()
    for _, i, step in rungs[low:]:  # then one step at a time, in the same order
        if len(trials) - probes >= MAX_TRIALS:
            break
        if i in frozen or step != chosen[i] + 1:
            continue
        steps = {**chosen, i: step}
        count = ladders[i][step]
        say(len(trials) - probes, MAX_TRIALS, f"prune: block {i} ({sites[i].form}) to {count}/{sites[i].units}")
        trial, e2e, ok = measure(steps, f"block {i} ({sites[i].form}) at {count}/{sites[i].units}")
        if ok:
            chosen, best_model, best_e2e = steps, trial, e2e
        else:
            frozen.add(i)
    per_layer = []
    for i, site in enumerate(sites):
        step = chosen[i]
        f = fit(i, step) if step >= 0 else None
        per_layer.append({"index": i, "node": site.name, "form": site.form, "width": site.units,
                          "kept": site.units if f is None else len(f.keep),
                          "held_error": None if f is None else round(f.held_error, 6),
                          "held_error_unrefitted": None if f is None else round(f.held_error_unrefitted, 6),
                          "ridge": None if f is None else f.ridge})
    before, after = linear_flops(work), linear_flops(best_model)
    report = {"prune": form, "blocks": len(sites), "blocks_pruned": sum(1 for s in chosen.values() if s >= 0),
              "blocks_dropped": sum(1 for e in per_layer if e["kept"] == 0),
              "per_layer": per_layer, "refused": refused, "calibration": data.describe(), "end_to_end": best_e2e,
              "linear_flops_per_token": {"before": before, "after": after,
                                          "removed_fraction": round(1 - after / before, 4) if before else 0.0},
              "trials": trials, "fidelity_bound": bound}
    return best_model, report


def rewrites(report: Mapping[str, Any]) -> dict[str, int]:
    """Units removed per form: neurons, heads (of blocks not dropped), and blocks dropped."""
    counts = {}
    for e in report["per_layer"]:
        rule = RULES["blocks"] if e["kept"] == 0 else RULES[e["form"]]
        counts[rule] = counts.get(rule, 0) + (1 if e["kept"] == 0 else e["width"] - e["kept"])
    return {k: v for k, v in counts.items() if v}


class Prune(ApproximateStep):
    """Structured pruning (FFN neurons, attention heads, whole blocks) with a least-squares
    refit of each block's output projection."""

    name = "prune"

    def __init__(self, options: Options, form: str) -> None:
        super().__init__(options)
        self.form = form

    def approximate(self, model: Model) -> Approximation:
        pruned, report = prune(model, self.options, self.form)
        return Approximation(pruned, rewrites(report), report)

    def details(self, report: dict[str, Any]) -> Details:
        flops = report["linear_flops_per_token"]
        what = " and ".join(WHAT[f] for f in FORMS[report["prune"]])
        table = Table(f"prune: {what} in {report['blocks_pruned']}/{report['blocks']} blocks "
                      f"(held-out rows: {report['calibration']['held_out_rows']})",
                      columns(("index", "block"), ("node", "node"), ("form", "form"), ("width", "units"), ("kept", "kept"),
                              ("held_error_unrefitted", "rel error, no refit", ".4f"), ("held_error", "rel error, refitted", ".4f")),
                      report["per_layer"], chart="held_error", unit="relative error")
        lines = [f"linear FLOPs per token: {flops['before']:,} -> {flops['after']:,} "
                 f"({flops['removed_fraction']:.1%} removed)", *end_to_end_lines(report["end_to_end"]),
                 f"{len(report['trials'])} end-to-end trials against the bound {report['fidelity_bound']}"]
        if report.get("blocks_dropped"):
            lines.insert(1, f"blocks dropped (output a constant, the residual passes): {report['blocks_dropped']}")
        lines += [f"not prunable: '{k}': {v}" for k, v in report["refused"].items()]
        return Details([table], dict(report["end_to_end"]), self.options.fidelity, lines, calibration_warnings(report))


def _step(value: str, options: Options):
    if value not in FORMS:
        raise InputError(f"unknown pruning form '{value}'", hint=f"choose from {', '.join(FORMS)}")
    return Prune(options, value)


registry.register_approximate("prune", _step, choices=lambda: tuple(FORMS))
