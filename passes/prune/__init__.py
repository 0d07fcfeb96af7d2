"""Structured pruning (approximate, training-free): `sites` finds what can be removed (FFN
neurons), `neurons` ranks and refits, `step` chooses how much under the fidelity bound.
Registered as the approximate option `prune` (optimize(prune="ffn"), --prune ffn)."""

from graphopt.passes.prune import step  # noqa: F401  (registers the step)
