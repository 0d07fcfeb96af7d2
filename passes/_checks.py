"""Precondition helpers shared by rules. Each returns None when the condition
holds, or a reason (a sentence naming the value) when it does not."""

from __future__ import annotations

from graphopt.ir import ir


def forwarding_blocker(source: ir.Value, replaced: ir.Value) -> str | None:
    """Why `replaced` cannot be substituted by `source` (deleting its producer), or None.

    onnxscript's replacement hands `replaced`'s name to `source`. That renames the
    model's interface when `source` is a graph input or an initializer, and merges
    two outputs into one when both are graph outputs. (fold-constants forwards
    initializers through Identity itself.)
    """
    if source.is_graph_input():
        return f"'{source.name}' is a graph input; forwarding it would rename it to '{replaced.name}'"
    if source.is_initializer():
        return f"'{source.name}' is an initializer; forwarding it would rename it to '{replaced.name}'"
    if replaced.is_graph_output() and source.is_graph_output():
        return f"'{replaced.name}' and '{source.name}' are both graph outputs"
    return None
