"""What a mixer request names (`MixerSpec`) and the kinds that answer it.

A kind is one module of this package (linear, window, hybrid, pool, drop) holding its ONNX
bodies, its torch reference, its fit and its graph edit; it registers a `MixerKind` here with
the mixer names it answers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from graphopt.errors import InputError
from graphopt.ir import ir
from graphopt.library.attention import is_canonical

SINKS = 4  # causal layers keep the first tokens visible in window attention (attention sinks)
WIDE_INIT = 0.3  # scale of the extra columns a wider Hedgehog map starts with


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    kind: str  # "linear", "window", "hybrid", "pool", "drop"
    feature_map: str | None = None  # Elu, Relu, Hedgehog, Performer
    dwc: bool = False  # SLAB's depthwise convolution branch on V, added to the linear attention
    max_window: int | None = None  # the largest softmax window (window, hybrid) the user allows; not in the name
    features: int = 1  # the Hedgehog map's width in head sizes (linear:hedgehog, hybrid): 2 x features x D; not in the name

    @classmethod
    def parse(cls, text: str) -> MixerSpec:
        if text not in names():
            raise InputError(f"unknown mixer '{text}'", hint=f"choose from {', '.join(names())}")
        kind, _, fmap = text.partition(":")
        fmap, _, branch = fmap.partition("+")
        return cls(kind, fmap.capitalize() or None, branch == "dwc")

    @property
    def name(self) -> str:
        base = f"{self.kind}:{self.feature_map.lower()}" if self.feature_map else self.kind
        return base + ("+dwc" if self.dwc else "")

    def cap(self, window: int) -> int:
        """`window` within the user's max_window."""
        return window if self.max_window is None else min(window, self.max_window)

    @property
    def has_weights(self) -> bool:
        return self.feature_map in ("Hedgehog", "Performer")

    def with_options(self, *, max_window: int | None = None, features: int = 1) -> MixerSpec:
        """This request with the user's options, checked: `features` widens a Hedgehog map only."""
        if features < 1:
            raise InputError(f"--features {features}: the Hedgehog map's width is a whole number of head sizes, at least 1")
        if features != 1 and self.feature_map != "Hedgehog" and self.kind != "hybrid":
            raise InputError(f"--features widens a Hedgehog feature map; mixer '{self.name}' has none",
                             hint="use it with linear:hedgehog or hybrid")
        return dataclasses.replace(self, max_window=max_window, features=features)


class MixerKind:
    """One kind of token mixer. Calibration calls `fit` per layer on the captured softmax
    attention (q, kt, v, bias, y per batch), `output` (the torch reference) to measure it on
    held-out batches, then `swap` to edit the graph."""

    kind: str
    names: tuple[str, ...]

    def fit(self, spec: MixerSpec, node: ir.Node, layer: int, fit: dict, held: dict, steps: int, seed: int) -> Any:
        """The layer's parameters (None when the kind has none)."""
        return None

    def fitted(self, spec: MixerSpec) -> bool:
        """Whether `fit` runs optimizer steps (the report's calibration steps)."""
        return False

    def output(self, spec: MixerSpec, node: ir.Node, q, kt, v, bias, w):
        """The mixer's output on captured inputs (torch), for its held-out error."""
        raise NotImplementedError

    def describe(self, spec: MixerSpec, node: ir.Node, w) -> dict[str, Any]:
        """Per-layer report fields beyond the error (window sizes, mixing factors)."""
        return {}

    def report_fields(self, spec: MixerSpec) -> dict[str, Any]:
        """Step-level report fields of this kind (the Hedgehog map's width)."""
        return {}

    def scores(self, model, batches, nodes) -> dict[str, list] | None:
        """Per-layer scores of this kind beyond the error, by report field (drop's redundancy),
        measured on the held-out `batches`; None when it has none."""
        return None

    def swap(self, model: ir.Model, node: ir.Node, spec: MixerSpec, w, *, quadratic: bool, layer: int) -> str:
        """Replace canonical attention op `node` by this mixer; returns what was done."""
        raise NotImplementedError


KINDS: dict[str, MixerKind] = {}
_NAMES: list[str] = []


def register(kind: MixerKind) -> MixerKind:
    KINDS[kind.kind] = kind
    _NAMES.extend(n for n in kind.names if n not in _NAMES)
    return kind


def names() -> tuple[str, ...]:
    return tuple(_NAMES)


def kind_of(spec: MixerSpec) -> MixerKind:
    return KINDS[spec.kind]


def attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    """Canonical attention ops in graph order: layer i is the i-th."""
    return [n for n in graph if is_canonical(n)]


def sinks_for(node: ir.Node) -> int:
    return SINKS if node.attributes.get_int("causal", 0) else 0


def scale_of(node: ir.Node) -> float:
    return node.attributes.get_float("scale", 1.0)


def is_causal(node: ir.Node) -> bool:
    return bool(node.attributes.get_int("causal", 0))


def heads_and_size(node: ir.Node, needed_by: str) -> tuple[int, int]:
    """(query heads, head size) of a canonical op, or an error naming what needs them."""
    heads, size = node.attributes.get_int("q_num_heads", 0), node.attributes.get_int("head_size", 0)
    if not heads or not size:
        raise InputError(f"attention '{node.name}' has unknown heads or head size; {needed_by} needs them")
    return heads, size


def layer_seed(seed: int, layer: int) -> int:
    """The seed of layer `layer`'s random initial weights: each layer draws its own."""
    return seed * 1000 + layer


def per_head_identity(node: ir.Node, needed_by: str, features: int = 1, seed: int = 0) -> np.ndarray:
    """[H, D, features x D]: per head the identity, then (features > 1) seeded Gaussian columns
    of scale WIDE_INIT: the feature-map weights a Hedgehog fit starts from."""
    heads, size = heads_and_size(node, needed_by)
    eye = np.tile(np.eye(size, dtype=np.float32), (heads, 1, 1))
    if features == 1:
        return eye
    extra = WIDE_INIT * np.random.default_rng(seed).standard_normal((heads, size, (features - 1) * size))
    return np.concatenate([eye, extra.astype(np.float32)], axis=-1)
