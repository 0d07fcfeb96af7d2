"""Token mixers (approximate): softmax attention layers swapped for cheaper token mixers,
calibrated on the user's data, with a fidelity report.

One module per mixer kind, each holding its ONNX bodies, its torch reference, its fit and its
graph edit: `linear` (elu, relu, hedgehog, performer feature maps; `dwc` its SLAB conv branch),
`window`, `hybrid` (with `_band`, the banded form both share), `pool`, `drop`. Shared parts:
`spec` (what a request names; the kind registry), `edit` (the graph edit every kind uses),
`transfer` (attention-transfer fitting), `state` (a KV cache becomes a recurrent state),
`fidelity` (per-layer and end-to-end measurements), `step` (the approximate step). Adding a
mixer is one module that registers a `spec.MixerKind`, and its test.
"""

# Importing a kind registers it; this order is the order `graphopt passes` and --help list them.
from graphopt.passes.mixers import linear  # noqa: F401, I001
from graphopt.passes.mixers import window  # noqa: F401
from graphopt.passes.mixers import hybrid  # noqa: F401
from graphopt.passes.mixers import pool  # noqa: F401
from graphopt.passes.mixers import drop  # noqa: F401
from graphopt.passes.mixers.spec import MixerSpec, attention_nodes, names
from graphopt.passes.mixers.step import MixResult, SwapMixers, capture, swap, swap_mixers

MIXERS = names()

__all__ = ["MIXERS", "MixResult", "MixerSpec", "SwapMixers", "attention_nodes", "capture", "swap", "swap_mixers"]
