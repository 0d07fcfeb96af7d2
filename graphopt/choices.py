"""Measured choices, cached on disk: a lowering or runtime choice is measured once per machine,
model structure, input shapes and runtime versions, then re-applied without timing.

Entries live under GRAPHOPT_CACHE_DIR (default ~/.cache/graphopt)/<kind>/<key>.json, written
atomically; a damaged entry reads as absent (measured again), a read-only home as no cache."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from graphopt import atomic
from graphopt.ir import ir


def cache_dir(kind: str) -> Path:
    return Path(os.environ.get("GRAPHOPT_CACHE_DIR") or Path.home() / ".cache" / "graphopt") / kind


def key(model: ir.Model, feeds: Mapping[str, np.ndarray], salt: str) -> str:
    """A key for a measured choice: the model's structure (not its weights), the input shapes
    and dtypes, and `salt` (the runtime versions, the machine, the candidates)."""
    h = hashlib.sha256()
    h.update(salt.encode())
    h.update(repr(sorted((k, tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in feeds.items())).encode())
    for graph in model.graphs():
        for node in graph:
            attrs = sorted((k, _attr_repr(a)) for k, a in node.attributes.items())
            shapes = [str(v.shape) if v is not None else "-" for v in node.inputs]
            h.update(f"{node.domain}:{node.op_type}:{attrs}:{shapes};".encode())
    return h.hexdigest()[:32]


def _attr_repr(attr) -> str:
    value = attr.value
    return f"tensor{tuple(value.shape)}" if hasattr(value, "shape") else str(value)


def path(kind: str, entry_key: str) -> Path:
    return cache_dir(kind) / f"{entry_key}.json"


def read(kind: str, entry_key: str) -> dict[str, Any] | None:
    """The cached entry, or None (absent or damaged)."""
    file = path(kind, entry_key)
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write(kind: str, entry_key: str, data: Mapping[str, Any]) -> None:
    try:
        atomic.write_text(path(kind, entry_key), json.dumps(dict(data), indent=1))
    except OSError:
        pass  # a read-only home still gets the choice, just not a cached one
