"""Classify attention masks by evaluating them.

Exporters build causal masks in many ways (Trilu, comparisons of Range outputs,
vmapped index functions, a KV-cache offset); rather than match each, graphopt runs
the part of the graph that computes a mask on generated inputs (every token valid,
so a padding mask hides nothing) and reads the pattern off the result: causal when
exactly the keys after each query (offset by any past length) are hidden.
"""

from __future__ import annotations

import numpy as np

from graphopt import calibration, feeds, verify
from graphopt.errors import GraphoptError
from graphopt.ir import ir

HIDDEN = -1e30  # additive mask entries at or below this hide a key (exporters use -inf or the dtype's lowest)


def classify_causal(model: ir.Model, biases: list[ir.Value], *, seq: int = 6, past: int = 3) -> dict[str, bool]:
    """{bias value name: causal?} for additive attention biases of shape [.., S, T].
    A bias the probe cannot evaluate is reported as not causal (the canonical op keeps
    the bias either way; `causal` only tells lowerings and mixers what it holds)."""
    probe = calibration.expose(model, [b.name for b in biases], only=True)
    if not probe.graph.outputs:
        return {}
    try:
        results = verify.run(probe, feeds.make_inputs(probe, dims=_probe_dims(probe.ir, seq, past)))
    except GraphoptError:
        return {}
    return {name: is_causal(np.asarray(array)) for name, array in results.items()}


def is_causal(bias: np.ndarray) -> bool:
    """True when bias[.., i, j] hides exactly the keys j > i + (T - S)."""
    if bias.ndim < 2 or bias.dtype.kind != "f":
        return False
    s, t = bias.shape[-2:]
    if s < 2:
        return False
    i, j = np.meshgrid(np.arange(s), np.arange(t), indexing="ij")
    future = j > i + (t - s)
    hidden = bias <= HIDDEN
    return bool(np.all(hidden[..., future]) and not np.any(hidden[..., ~future]))


def _probe_dims(model: ir.Model, seq: int, past: int) -> dict[str, int]:
    """Bind symbolic input dims consistently for a decoder with a KV cache: past lengths,
    totals (named so, or written as a sum) = seq + past, everything else seq or batch 1."""
    dims = {"batch": 1, "seq": seq}
    for value in model.graph.inputs:
        for dim in value.shape or ():
            name = getattr(dim, "value", None)
            if not isinstance(name, str):
                continue
            lowered = name.lower()
            if "past" in lowered and "+" not in lowered:
                dims[name] = past
            elif "total" in lowered or "+" in lowered:
                dims[name] = seq + past
    return dims
