"""The built-in families, by module name: importing each registers what it brings (passes,
approximate steps, lowering targets, graphopt functions, analyses). The core reaches families
only through this list and the registries they fill, never by importing them."""

from __future__ import annotations

import importlib

BUILTIN = ("graphopt.library", "graphopt.passes", "graphopt.backends.ort", "graphopt.backends.openvino",
           "graphopt.backends.tvm", "graphopt.backends.cpu")


def load() -> None:
    for name in BUILTIN:
        importlib.import_module(name)
