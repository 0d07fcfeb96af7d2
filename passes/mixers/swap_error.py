"""How far a swap moved the model: per layer on the captured attention, end to end on the
held-out batches (with the KV-cache past fed as state where a cache became one)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from graphopt import fidelity
from graphopt.model import Model
from graphopt.passes.mixers import spec as specs, state, transfer
from graphopt.passes.mixers.linear import linear_state

Feeds = Mapping[str, np.ndarray]


def layer_error(spec: specs.MixerSpec, node, cap, w) -> dict[str, float]:
    """Held-out error of the mixer against the captured softmax output, on the captured inputs."""
    import torch

    kind = specs.kind_of(spec)
    num = den = 0.0
    cosines = []
    with torch.no_grad():
        for q, kt, v, b, y in zip(cap["q"], cap["kt"], cap["v"], cap["bias"], cap["y"]):
            q, kt, v, y = (torch.as_tensor(a) for a in (q, kt, v, y))
            out = kind.output(spec, node, q, kt, v, b, w)
            num += float(((out - y) ** 2).sum())
            den += float((y ** 2).sum())
            cosines.append(float(torch.nn.functional.cosine_similarity(out.flatten(), y.flatten(), dim=0)))
    return {"rel_error": round((num / max(den, 1e-30)) ** 0.5, 6), "cosine": round(float(np.mean(cosines)), 6)}


class Measure:
    """End-to-end fidelity of a swapped model on the held-out batches. Where a layer's KV cache
    became a state (passes/mixers/state.py), the swapped model is fed the state of the past
    tokens instead, computed from the captured keys and values: the same function of the past
    that the cache gave the parallel form, so both read the same history."""

    def __init__(self, spec, nodes, weights, batches, caps, references):
        self.spec, self.nodes, self.weights = spec, nodes, weights
        self.batches, self.caps, self.references = batches, caps, references

    def __call__(self, swapped: Model) -> dict[str, Any]:
        return fidelity.end_to_end(self.references, swapped, [self.feeds(swapped, b) for b in range(len(self.batches))])

    def feeds(self, swapped: Model, b: int) -> dict[str, np.ndarray]:
        import torch

        names = {v.name for v in swapped.ir.graph.inputs}
        feeds = {k: v for k, v in self.batches[b].items() if k in names}
        for i, node in enumerate(self.nodes):
            if f"{state.STATE}.{i}" not in names:
                continue
            cap = self.caps[i]
            q, kt, v, bias = cap["q"][b], cap["kt"][b], cap["v"][b], cap["bias"][b]
            past = kt.shape[-1] - q.shape[-2]
            w = self.weights.get(i)
            with torch.no_grad():
                s, z = linear_state(self.spec.feature_map, torch.as_tensor(kt[..., :past]), torch.as_tensor(v[:, :, :past]),
                                    transfer.keymask(bias)[:, :, :past], specs.scale_of(node),
                                    None if w is None else torch.as_tensor(w))
            batch = q.shape[0]
            feeds[f"{state.STATE}.{i}"] = np.ascontiguousarray(s.expand(batch, *s.shape[1:]).numpy())
            feeds[f"{state.NORMALIZER}.{i}"] = np.ascontiguousarray(z.expand(batch, *z.shape[1:]).numpy())
            feeds[state.PAST_LENGTH] = np.array([past], np.int64)
        return {k: v for k, v in feeds.items() if k in names}
