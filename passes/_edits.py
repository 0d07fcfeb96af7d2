"""Graph edits shared by the structural passes."""

from __future__ import annotations

from graphopt.ir import ir


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Every reader of `old` reads `new` instead, and a graph output keeps its name.

    A fresh `new` (no type yet) takes `old`'s type and shape. When `old` is a graph output and
    `new` is a graph input, an initializer or another output, whose names must not change, the
    output becomes an Identity of `new`."""
    if new.type is None:
        new.type, new.shape = old.type, old.shape
    if not old.is_graph_output():
        old.replace_all_uses_with(new)
        return
    if new.is_graph_input() or new.is_initializer() or new.is_graph_output():
        identity = ir.node("Identity", [new])
        graph.append(identity)
        identity.outputs[0].type, identity.outputs[0].shape = new.type, new.shape
        new = identity.outputs[0]
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = f"{name}_replaced"
    new.name = name


def append_add(graph: ir.Graph, node: ir.Node, addend: ir.Value) -> ir.Value:
    """Add(node's output, addend) right after `node`; it takes over every other reader of that
    output, and its name and slot when it is a graph output. Returns the Add's output."""
    out = node.outputs[0]
    add = ir.node("Add", [out, addend])
    graph.insert_after(node, add)
    new = add.outputs[0]
    new.type, new.shape = out.type, out.shape
    for reader, index in list(out.uses()):
        if reader is not add:
            reader.replace_input_with(index, new)
    if out.is_graph_output():
        name, out.name = out.name, f"{out.name}_before_add"
        new.name = name
        graph.outputs[:] = [new if v is out else v for v in graph.outputs]
    return new
