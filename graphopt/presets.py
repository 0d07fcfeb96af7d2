"""Presets: ordered tuples of pass names. Order matters where commented."""

from __future__ import annotations

from collections.abc import Sequence

from graphopt.errors import InputError

_CLEANUP = (
    # First: exporters emit Shape -> Gather -> Concat chains and Constant nodes that
    # later rules must see as constants.
    "fold-constants",
    # After folding, which leaves Identity nodes and Casts to the same type behind.
    "eliminate-identity",
    # After identity elimination, so readers of x and of Identity(x) unify.
    "cse",
    # Last: removes everything the passes above orphaned.
    "eliminate-dead-code",
)

_EXACT = (
    *_CLEANUP[:-1],  # cleanup first: rules see folded constants (Identity/Cast-wrapped weights unwrapped)
    # Before every fusion: jax2tf's reductions drop their axes and broadcast them back, and
    # the norm and softmax patterns are written with the axes kept.
    "restore-keepdims",
    # Norm fusion after identity elimination: legacy exports wrap RMSNorm in same-type Casts
    # that would otherwise sit between the norm and its weight.
    "fuse-norms",
    # After fusion, so decomposed norms are recognized; its readers then carry the affine.
    "fold-norm-affine",
    # Pre-LN -> Pre-RMSNorm needs fused LayerNorms; its refusal reason names Post-LN models.
    "pre-rmsnorm",
    "fuse-activations",
    # The scale fold before the Q/K/V merge: afterwards Q is one column block of a merged
    # projection (which the fold also handles, but with one more Split to see through).
    "fold-attention-scale",
    "merge-parallel-linears",
    # After the folds above, which can leave a constant scale or shift right after a MatMul.
    "merge-linear-chains",
    # After every rewrite inside attention (the scale fold and the Q/K/V merge look for the
    # decomposed scores MatMul): the layers become canonical attention ops.
    "fuse-attention",
    # BatchNorm folding before branch merging: a RepVGG block is Add(Conv+BN, Conv+BN, BN)
    # and merge-branches needs the Conv+BN pairs to be plain Convs first.
    "fold-batchnorm",
    "merge-branches",
    # Last: rewrites orphan the original weights.
    "eliminate-dead-code",
)

PRESETS: dict[str, tuple[str, ...]] = {
    "cleanup": _CLEANUP,
    "exact": _EXACT,  # the default
    # Approximate: the exact preset (which makes the canonical attention ops), then the
    # calibrated mixer swap (graphopt/passes/mixers/), configured by optimize(mixer=...).
    "mixers": _EXACT,
}
# Presets that end in an approximate step, and the optimize() option that configures it.
APPROXIMATE = {"mixers": "mixer"}

DEFAULT = "exact"


def resolve(preset: str | None = DEFAULT, passes: Sequence[str] | None = None) -> list[str]:
    """Explicit `passes` win over `preset`; unknown names raise `InputError`."""
    if passes:
        return list(passes)
    name = preset or DEFAULT
    if name not in PRESETS:
        raise InputError(f"unknown preset '{name}'", hint=f"known presets: {', '.join(sorted(PRESETS))}")
    return list(PRESETS[name])
