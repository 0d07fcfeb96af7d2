"""Swap softmax attention for efficient token mixers, calibrated, with a fidelity report.

    result = swap_mixers(model, "linear:hedgehog", calib="calib.npz", layers="auto", fidelity=0.99)

1. Calibration data: the user's (.npz path, dict of arrays, or a list of dicts; a batch of
   more than one row is split in halves: fit on the first, measure on the second) or, with a
   loud warning, generated inputs.
2. Capture: the model runs in onnxruntime with every canonical attention op's Q, K^T, V, bias
   and output exposed as extra outputs.
3. Fit (Hedgehog): per layer, W minimizes the error of the linear attention output against the
   captured softmax output (attention transfer, torch autograd, `steps` Adam steps).
4. Select: `layers` = "all", a list of indices, or "auto": layers ranked by their held-out
   error, swapped greedily while the end-to-end output cosine stays >= `fidelity`.
5. Report: per layer relative error ||y - y'|| / ||y|| and cosine on held-out data; end to
   end: output cosine, max error, KL divergence for logit outputs; what was kept and why.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphopt import feeds as feeds_mod, verify
from graphopt.errors import InputError
from graphopt.ir import ir
from graphopt.masks import HIDDEN
from graphopt.model import Model
from graphopt.passes import mixer_state, mixers
from graphopt.shapes import infer_shapes

Feeds = Mapping[str, np.ndarray]


@dataclasses.dataclass
class MixResult:
    model: Model
    report: dict[str, Any]
    convert: Callable[[Feeds], dict[str, np.ndarray]] | None = None  # original feeds -> the swapped model's

    def feeds_for(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """The swapped model's inputs for the original's `feeds`: the same, except that where a
        KV cache became a state, the state of the fed past replaces it."""
        return dict(feeds) if self.convert is None else self.convert(feeds)


def swap_mixers(model: Model, mixer: str, *, calib: Any = None, holdout: Any = None, layers: str | Sequence[int] = "all",
                fidelity: float = 0.99, steps: int = 300, seed: int = 0, dims: Mapping[str, int] | None = None,
                progress: Callable[[str], None] | None = None, seq: int | None = None) -> MixResult:
    """`layers`: "all", "auto", "best:N" (the N layers with the lowest held-out error) or
    indices. `holdout`: explicit held-out batches (else half of `calib` is held out).
    `seq`: the sequence length the model will run at, which picks each linear mixer's
    evaluation order (default: the calibration data's)."""
    spec = mixers.MixerSpec.parse(mixer)
    work = model.clone()
    infer_shapes(work.ir)
    nodes = mixers.attention_nodes(work.ir.graph)
    if not nodes:
        raise InputError("no canonical attention ops to swap", hint="run the exact preset (fuse-attention) first")
    fit_feeds, held_feeds, source, warning = _calibration(work, calib, seed, dims, split=holdout is None)
    if holdout is not None:
        fit_feeds = fit_feeds + held_feeds
        held_feeds = [holdout] if isinstance(holdout, Mapping) else list(holdout)
    say = progress or (lambda _msg: None)
    say("capturing attention inputs and outputs")
    fit_caps = capture(work, fit_feeds, nodes)
    held_caps = capture(work, held_feeds, nodes)
    per_layer = []
    weights: dict[int, np.ndarray | None] = {}
    for i, node in enumerate(nodes):
        say(f"layer {i + 1}/{len(nodes)}: {'fitting' if spec.feature_map == 'Hedgehog' else 'measuring'}")
        w = mixers.initial_weights(spec, node, i, seed) if spec.kind == "linear" else None
        if spec.feature_map == "Hedgehog":
            w = fit_hedgehog(fit_caps[i], node, w, steps, seed)
        elif spec.kind == "window":
            w = {"window": choose_window(fit_caps[i], node)}
        elif spec.kind == "hybrid":
            w = fit_hybrid(fit_caps[i], node, choose_window(fit_caps[i], node, HYBRID_COVERAGE), steps, seed)
        if spec.kind in ("window", "hybrid"):
            w["mask_only"] = _mask_only(fit_caps[i]) and _mask_only(held_caps[i])
        if spec.dwc:
            w = fit_token_conv(spec, fit_caps[i], node, mixers.initial_conv(node), steps, seed)
        weights[i] = w
        per_layer.append({"index": i, "node": node.name, **layer_error(spec, node, held_caps[i], w),
                          **({"window": w["window"], "sinks": mixers.sinks_for(node)} if spec.kind == "window" else {}),
                          **({"window": int(w["window"]), "gamma": [round(float(g), 4) for g in w["gamma"].ravel()]}
                             if spec.kind == "hybrid" else {})})
    if spec.kind == "drop":  # rank by redundancy: cos(X, X + Attn(Norm(X))) on the residual stream
        for entry, score in zip(per_layer, redundancy(work, held_feeds, nodes)):
            entry["redundancy"] = score
    references = [verify.run(work, f) for f in held_feeds]  # the original's held-out outputs, run once
    measure = _Measure(spec, nodes, weights, held_feeds, held_caps, references)
    chosen, selection_note = _select(work, nodes, spec, weights, per_layer, layers, fidelity, measure, seq)
    done: dict[int, str] = {}
    swapped = _apply(work, nodes, spec, weights, chosen, seq or _seq_hint(held_feeds), done)
    end_to_end = measure(swapped)
    for entry in per_layer:
        entry["swapped"] = entry["index"] in chosen
        if entry["index"] in done:
            entry["as"] = done[entry["index"]]
        if not entry["swapped"]:
            entry["kept_because"] = selection_note.get(entry["index"], "not selected (--layers)")
    report = {
        "mixer": spec.name, "layers_swapped": sorted(chosen), "layers_total": len(nodes),
        "per_layer": per_layer, "end_to_end": end_to_end,
        "calibration": {"source": source, "fit_rows": _rows(fit_feeds), "held_out_rows": _rows(held_feeds),
                        "steps": steps if spec.feature_map == "Hedgehog" or spec.dwc or spec.kind == "hybrid" else 0, **({"warning": warning} if warning else {})},
        "selection": {"layers": layers if isinstance(layers, str) else list(layers), "fidelity_threshold": fidelity},
    }
    decode = _decode_report(model, swapped)
    if decode:
        report["decode"] = decode
    convert = None
    if decode:
        def convert(feeds: Feeds) -> dict[str, np.ndarray]:
            single = _Measure(spec, nodes, weights, [feeds], capture(work, [feeds], nodes), None)
            return single.feeds(swapped, 0)
    return MixResult(swapped, report, convert)


def capture(model: Model, batches: Sequence[Feeds], nodes: Sequence[ir.Node]) -> list[dict[str, list[np.ndarray]]]:
    """Per canonical op: lists (one entry per batch) of q, kt, v, bias (or None) and y."""
    wanted = [[v.name if v is not None else None for v in (*node.inputs, node.outputs[0])] for node in nodes]
    exposed = verify.expose(model, [n for row in wanted for n in row if n])
    results = [verify.run(exposed, feeds) for feeds in batches]
    caps = []
    for row in wanted:
        keys = ("q", "kt", "v", "bias", "y") if len(row) == 5 else ("q", "kt", "v", "y")
        entry = {k: [r[n] for r in results] for k, n in zip(keys, row)}
        entry.setdefault("bias", [None] * len(results))
        caps.append(entry)
    return caps


def redundancy(model: Model, batches: Sequence[Feeds], nodes: Sequence[ir.Node]) -> list[float | None]:
    """Per attention sub-layer, the mean over real tokens of cos(X, X + A), with X the residual
    stream entering the block and A what attention adds to it: near 1, the layer barely moves
    the stream and dropping it changes little. None where no residual Add is found."""
    found = [mixers.residual_add(n) for n in nodes]
    exposed = verify.expose(model, [v.name for f in found if f is not None for v in f[1:]])
    results = [verify.run(exposed, f) for f in batches]
    scores: list[float | None] = []
    for f in found:
        if f is None:
            scores.append(None)
            continue
        cosines = []
        for r, feeds in zip(results, batches):
            x = r[f[1].name].astype(np.float64)
            y = x + r[f[2].name]
            cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-30)
            mask = feeds.get("attention_mask")
            cosines.append(cos[mask.astype(bool)] if mask is not None and mask.shape == cos.shape else cos.ravel())
        scores.append(round(float(np.concatenate(cosines).mean()), 6))
    return scores


def _rank_key(entry: dict[str, Any]) -> float:
    """Most swappable first: the most redundant layers for drop, else the lowest held-out error."""
    if entry.get("redundancy") is not None:
        return -entry["redundancy"]
    return entry["rel_error"]


def keymask(bias: np.ndarray | None):
    """The torch twin of passes/mixers._keymask: [B|1, 1, T, 1] from the additive bias."""
    import torch

    if bias is None:
        return torch.ones(1, 1, 1, 1)
    visible = (torch.as_tensor(bias)[..., -1:, :] > HIDDEN).float()
    return visible.amin(dim=1, keepdim=True).transpose(-1, -2)


def _mixer_output(spec, node, q, kt, v, bias, w):
    import torch

    from graphopt import mixer_reference as ref

    if spec.kind == "pool":
        return ref.pool(v, causal=bool(node.attributes.get_int("causal", 0)), queries=q.shape[-2])
    if spec.kind == "drop":
        return torch.zeros_like(q[..., : v.shape[-1]])
    if spec.kind == "hybrid":
        return ref.hybrid_attention(q, kt, v, None if bias is None else torch.as_tensor(bias),
                                    node.attributes.get_float("scale", 1.0), int(w["window"]), mixers.sinks_for(node),
                                    torch.as_tensor(w["W"]), torch.as_tensor(w["gamma"]))
    if spec.kind == "window":
        return ref.window_attention(q, kt, v, None if bias is None else torch.as_tensor(bias),
                                    node.attributes.get_float("scale", 1.0), int(w["window"]), mixers.sinks_for(node))
    causal = bool(node.attributes.get_int("causal", 0))
    scale = node.attributes.get_float("scale", 1.0)
    if spec.dwc:
        return (ref.linear_attention(spec.feature_map, q, kt, v, keymask(bias), scale, None, causal)
                + ref.token_conv(q, v, keymask(bias), torch.as_tensor(w), causal))
    return ref.linear_attention(spec.feature_map, q, kt, v, keymask(bias), scale, w, causal)


WINDOW_COVERAGE = 0.95
HYBRID_COVERAGE = 0.5  # the hybrid's softmax window holds half the attention mass; linear attention the rest


def choose_window(cap, node, coverage: float = WINDOW_COVERAGE) -> int:
    """The effective attended distance: the smallest w such that, over the calibration queries
    (real tokens only), keys within distance w carry `coverage` of the attention mass."""
    import torch

    scale = node.attributes.get_float("scale", 1.0)
    total = np.zeros(0)
    with torch.no_grad():
        for q, kt, b in zip(cap["q"], cap["kt"], cap["bias"]):
            q, kt = torch.as_tensor(q), torch.as_tensor(kt)
            scores = (q @ kt) * scale + (torch.as_tensor(b) if b is not None else 0)
            probs = torch.softmax(scores, dim=-1)  # [B, H, S, T]
            s, t = probs.shape[-2:]
            dist = ((torch.arange(s)[:, None] + (t - s)) - torch.arange(t)[None, :]).abs()
            by_distance = torch.zeros(*probs.shape[:-1], t).scatter_add_(-1, dist.expand_as(probs).contiguous(), probs)
            if b is not None:  # padded queries do not count
                by_distance = by_distance * keymask(b)[:, :, t - s:, :]
            mass = by_distance.sum(dim=(0, 1, 2)).numpy()
            if len(mass) > len(total):
                total = np.pad(total, (0, len(mass) - len(total)))
            total[: len(mass)] += mass
    cumulative = np.cumsum(total) / total.sum()
    return int(np.searchsorted(cumulative, coverage))


def _mask_only(cap) -> bool:
    """Whether the layer's bias only hides keys (entries 0 or hidden) on every captured batch:
    then the key mask says all it does, and window attention can compute just the band."""
    return all(b is None or bool(np.all((b == 0) | (b <= HIDDEN))) for b in cap["bias"])


def fit_hybrid(cap, node, window: int, steps: int, seed: int) -> dict[str, Any]:
    """Attention transfer for the hybrid: Hedgehog maps W and the per-head mixing factor gamma."""
    import torch

    from graphopt import mixer_reference as ref

    heads, size = node.attributes.get_int("q_num_heads", 0), node.attributes.get_int("head_size", 0)
    if not heads or not size:
        raise InputError(f"attention '{node.name}' has unknown heads or head size; the hybrid mixer needs them")
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.eye(size).repeat(heads, 1, 1))
    log_gamma = torch.nn.Parameter(torch.zeros(1, heads, 1, 1))
    opt = torch.optim.Adam([w, log_gamma], lr=1e-2)
    scale, sinks = node.attributes.get_float("scale", 1.0), mixers.sinks_for(node)
    batches = [tuple(torch.as_tensor(a) if a is not None else None for a in row)
               for row in zip(cap["q"], cap["kt"], cap["v"], cap["bias"], cap["y"])]
    for step in range(max(steps, 0)):
        q, kt, v, b, y = batches[step % len(batches)]
        out = ref.hybrid_attention(q, kt, v, b, scale, window, sinks, w, log_gamma.exp())
        loss = ((out - y) ** 2).mean() / (y.pow(2).mean() + 1e-12)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"W": w.detach().numpy().astype(np.float32), "gamma": log_gamma.detach().exp().numpy().astype(np.float32),
            "window": window}


def fit_token_conv(spec, cap, node, w0: np.ndarray, steps: int, seed: int) -> np.ndarray:
    """SLAB's depthwise-conv branch: the kernel minimizing the error of linear attention + conv
    against the captured softmax output (the feature map has no parameters: fixed)."""
    import torch

    from graphopt import mixer_reference as ref

    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.as_tensor(w0).clone())
    opt = torch.optim.Adam([w], lr=1e-2)
    scale = node.attributes.get_float("scale", 1.0)
    causal = bool(node.attributes.get_int("causal", 0))
    batches = []
    with torch.no_grad():
        for q, kt, v, b, y in zip(cap["q"], cap["kt"], cap["v"], cap["bias"], cap["y"]):
            q, kt, v, y = (torch.as_tensor(a) for a in (q, kt, v, y))
            base = ref.linear_attention(spec.feature_map, q, kt, v, keymask(b), scale, None, causal)
            mask = keymask(b)[:, :, kt.shape[-1] - q.shape[-2]:] if b is not None else 1.0
            batches.append((q, v, keymask(b), y - base, mask, y.pow(2).mean()))
    for step in range(max(steps, 0)):
        q, v, km, residual, mask, norm = batches[step % len(batches)]
        loss = (((ref.token_conv(q, v, km, w, causal) - residual) ** 2) * mask).mean() / (norm + 1e-12)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach().numpy().astype(np.float32)


def fit_hedgehog(cap, node, w0: np.ndarray, steps: int, seed: int) -> np.ndarray:
    """Attention transfer: W minimizing the mean squared error to the captured softmax output."""
    import torch

    from graphopt import mixer_reference as ref

    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.as_tensor(w0).clone())
    opt = torch.optim.Adam([w], lr=1e-2)
    scale = node.attributes.get_float("scale", 1.0)
    causal = bool(node.attributes.get_int("causal", 0))
    batches = [tuple(torch.as_tensor(a) if a is not None else None for a in (q, kt, v, b, y))
               for q, kt, v, b, y in zip(cap["q"], cap["kt"], cap["v"], cap["bias"], cap["y"])]
    for step in range(max(steps, 0)):
        q, kt, v, b, y = batches[step % len(batches)]
        out = ref.linear_attention("Hedgehog", q, kt, v, keymask(b), scale, w, causal)
        mask = keymask(b)[:, :, kt.shape[-1] - q.shape[-2]:] if b is not None else 1.0  # padded queries do not count
        loss = (((out - y) ** 2) * mask).mean() / (y.pow(2).mean() + 1e-12)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach().numpy().astype(np.float32)


def layer_error(spec, node, cap, w) -> dict[str, float]:
    """Held-out error of the mixer against the captured softmax output, on the captured inputs."""
    import torch

    num = den = 0.0
    cosines = []
    with torch.no_grad():
        for q, kt, v, b, y in zip(cap["q"], cap["kt"], cap["v"], cap["bias"], cap["y"]):
            t = [torch.as_tensor(a) for a in (q, kt, v, y)]
            out = _mixer_output(spec, node, t[0], t[1], t[2], b, torch.as_tensor(w) if isinstance(w, np.ndarray) else w)
            y_ = t[3]
            num += float(((out - y_) ** 2).sum())
            den += float((y_ ** 2).sum())
            cosines.append(float(torch.nn.functional.cosine_similarity(out.flatten(), y_.flatten(), dim=0)))
    return {"rel_error": round((num / max(den, 1e-30)) ** 0.5, 6), "cosine": round(float(np.mean(cosines)), 6)}


def end_to_end_fidelity(refs: Sequence[Mapping[str, np.ndarray]], swapped: Model, batches: Sequence[Feeds]) -> dict[str, Any]:
    """`swapped` against the original's outputs `refs` on the same `batches`, per output: cosine
    per row (mean and min over held-out rows), max abs error, and the KL divergence of the
    softmax for outputs named like logits."""
    gots = [verify.run(swapped, f) for f in batches]
    out = {}
    for name in refs[0]:
        if name not in gots[0]:  # a KV cache output replaced by a state (report["decode"])
            continue
        cosines, worst, kls = [], 0.0, []
        for r, g in zip(refs, gots):
            a, b = (np.atleast_1d(x[name]).astype(np.float64) for x in (r, g))  # rows: the leading axis
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            cosines.extend((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30))
            worst = max(worst, float(np.abs(a - b).max()))
            if "logit" in name.lower():
                kls.append(_kl(r[name], g[name]))
        entry = {"mean_cosine": round(float(np.mean(cosines)), 6), "min_cosine": round(float(np.min(cosines)), 6),
                 "max_abs_error": worst}
        if kls:
            entry["kl_divergence"] = float(np.mean(kls))
        out[name] = entry
    return out


class _Measure:
    """End-to-end fidelity of a swapped model on the held-out batches. Where a layer's KV cache
    became a state (passes/mixer_state.py), the swapped model is fed the state of the past
    tokens instead, computed from the captured keys and values: the same function of the past
    that the cache gave the parallel form, so both read the same history."""

    def __init__(self, spec, nodes, weights, batches, caps, references):
        self.spec, self.nodes, self.weights = spec, nodes, weights
        self.batches, self.caps, self.references = batches, caps, references

    def __call__(self, swapped: Model) -> dict[str, Any]:
        return end_to_end_fidelity(self.references, swapped, [self.feeds(swapped, b) for b in range(len(self.batches))])

    def feeds(self, swapped: Model, b: int) -> dict[str, np.ndarray]:
        import torch

        from graphopt import mixer_reference as ref

        names = {v.name for v in swapped.ir.graph.inputs}
        feeds = {k: v for k, v in self.batches[b].items() if k in names}
        for i, node in enumerate(self.nodes):
            if f"{mixer_state.STATE}.{i}" not in names:
                continue
            cap = self.caps[i]
            q, kt, v, bias = cap["q"][b], cap["kt"][b], cap["v"][b], cap["bias"][b]
            past = kt.shape[-1] - q.shape[-2]
            w = self.weights.get(i)
            with torch.no_grad():
                state, normalizer = ref.linear_state(
                    self.spec.feature_map, torch.as_tensor(kt[..., :past]), torch.as_tensor(v[:, :, :past]),
                    keymask(bias)[:, :, :past], node.attributes.get_float("scale", 1.0),
                    None if w is None else torch.as_tensor(w))
            batch = q.shape[0]
            feeds[f"{mixer_state.STATE}.{i}"] = np.ascontiguousarray(state.expand(batch, *state.shape[1:]).numpy())
            feeds[f"{mixer_state.NORMALIZER}.{i}"] = np.ascontiguousarray(
                normalizer.expand(batch, *normalizer.shape[1:]).numpy())
            feeds[mixer_state.PAST_LENGTH] = np.array([past], np.int64)
        return {k: v for k, v in feeds.items() if k in names}


def _decode_report(original: Model, swapped: Model) -> dict[str, Any] | None:
    """What a decoding loop must feed and read now that KV caches became states."""
    before = {v.name for v in original.ir.graph.inputs} | {v.name for v in original.ir.graph.outputs}
    after_in = [v.name for v in swapped.ir.graph.inputs]
    after_out = [v.name for v in swapped.ir.graph.outputs]
    if not any(n.startswith(mixer_state.STATE) for n in after_in):
        return None
    return {
        "state_inputs": [n for n in after_in if n not in before],
        "state_outputs": [n for n in after_out if n not in before],
        "removed": sorted(before - set(after_in) - set(after_out)),
        "how": (f"start with zero states ({mixer_state.PAST_LENGTH} 0); after each call feed present_state.i / "
                f"present_normalizer.i back as past_state.i / past_normalizer.i"
                + (f" and add the new tokens to {mixer_state.PAST_LENGTH}" if mixer_state.PAST_LENGTH in after_in else "")),
    }


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _apply(model: Model, nodes, spec, weights, chosen: set[int], seq_hint: int, done: dict | None = None) -> Model:
    """A copy of `model` with layers `chosen` swapped; `done` collects what each swap did."""
    work = model.clone()
    by_name = {n.name: n for n in mixers.attention_nodes(work.ir.graph)}
    for i in sorted(chosen):
        node = by_name[nodes[i].name]
        what = mixers.swap(work.ir, node, spec, weights.get(i), quadratic=_quadratic(spec, node, seq_hint), layer=i)
        if done is not None:
            done[i] = what
    mixer_state.finish(work.ir)
    return work


def _quadratic(spec, node, seq: int) -> bool:
    """Evaluation order by cost: Q (K^T V) costs ~ 2 T F Dv, (Q K^T) V ~ T^2 (F + Dv) per head."""
    if spec.kind != "linear":
        return False
    d = node.attributes.get_int("head_size", 0) or 64
    f = 2 * d if spec.feature_map == "Hedgehog" else 4 * d if spec.feature_map == "Performer" else d
    return seq * (f + d) < 2 * f * d


def _select(model, nodes, spec, weights, per_layer, layers, fidelity, measure, seq_override=None):
    if layers == "all":
        return set(range(len(nodes))), {}
    if isinstance(layers, str) and layers.startswith("best:"):
        n = int(layers.split(":", 1)[1])
        order = sorted(range(len(nodes)), key=lambda i: _rank_key(per_layer[i]))
        return set(order[:n]), {i: f"not among the {n} most swappable layers (held-out error, or redundancy for drop)"
                                for i in order[n:]}
    if layers != "auto":
        chosen = set(int(i) for i in layers)
        bad = sorted(i for i in chosen if not 0 <= i < len(nodes))
        if bad:
            raise InputError(f"--layers names {bad}, but the model has attention layers 0..{len(nodes) - 1}")
        return chosen, {}
    order = sorted(range(len(nodes)), key=lambda i: _rank_key(per_layer[i]))
    chosen: set[int] = set()
    notes = {}
    seq = seq_override or _seq_hint(measure.batches)
    for i in order:
        trial = _apply(model, nodes, spec, weights, chosen | {i}, seq)
        fid = measure(trial)
        worst = min(v["mean_cosine"] for v in fid.values())
        if worst >= fidelity:
            chosen.add(i)
        else:
            notes[i] = f"swapping it too brings the end-to-end mean cosine to {worst:.4f} < {fidelity}"
    return chosen, notes


def _calibration(model: Model, calib, seed, dims, *, split: bool = True):
    """(fit batches, held-out batches, source, warning); without `split` every batch is for fitting."""
    warning = None
    if calib is None:
        warning = ("no calibration data: fitted and measured on generated inputs, which say little about real "
                   "data; pass --calib data.npz")
        batches = [feeds_mod.make_inputs(model, seed=seed + i, dims=dims) for i in range(4)]
        return batches[:2], batches[2:], "generated", warning
    if callable(calib):
        calib = calib()
    if isinstance(calib, (str, os.PathLike)):
        source = os.fspath(calib)
        calib = feeds_mod.load_inputs(calib, model)
    else:
        source = "user arrays"
    if not split:
        return ([calib] if isinstance(calib, Mapping) else list(calib)), [], source, warning
    if isinstance(calib, Mapping):
        rows = next(iter(calib.values())).shape[0]
        if rows < 2:
            raise InputError("calibration data needs at least 2 rows (half to fit, half to measure)")
        half = rows // 2
        return ([{k: v[:half] for k, v in calib.items()}], [{k: v[half:] for k, v in calib.items()}], source, warning)
    batches = list(calib)
    if len(batches) < 2:
        raise InputError("calibration data needs at least 2 batches (half to fit, half to measure)")
    half = len(batches) // 2
    return batches[:half], batches[half:], source, warning


def _rows(batches) -> int:
    return int(sum(next(iter(b.values())).shape[0] for b in batches))


def _seq_hint(batches) -> int:
    shapes = [a.shape for b in batches for a in b.values() if a.ndim >= 2]
    return int(max((s[1] for s in shapes), default=128))


__all__ = ["MixResult", "swap_mixers", "capture", "end_to_end_fidelity"]
