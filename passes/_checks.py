"""Precondition helpers shared by rules. Each returns None when the condition
holds, or a reason (a sentence naming the value) when it does not."""

from __future__ import annotations

from graphopt.ir import ir


def forwarding_blocker(source: ir.Value, replaced: ir.Value) -> str | None:
    """Why `replaced` cannot be substituted by `source` (deleting its producer), or None.

    Substitution hands `replaced`'s name to `source`. When `replaced` is a graph
    output, that would rename a graph input, an initializer or another output.
    """
    if not replaced.is_graph_output():
        return None
    if source.is_graph_input():
        return f"'{replaced.name}' is a graph output fed straight from graph input '{source.name}'"
    if source.is_initializer():
        return f"'{replaced.name}' is a graph output fed straight from initializer '{source.name}'"
    if source.is_graph_output():
        return f"'{replaced.name}' and '{source.name}' are both graph outputs"
    return None
