"""The layout the architecture promises: the core (graphopt/) has no import cycle and never
imports a pass family; families reach the core only through its registries."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "graphopt"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """graphopt modules that `path` imports (`from graphopt import x` names module graphopt.x;
    the package `graphopt` itself is not counted: every submodule's import runs it first)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("graphopt")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("graphopt") and not node.level:
            if node.module != "graphopt":
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found - {"graphopt"}


def test_core_import_graph_has_no_cycle():
    """Module-level imports between core modules form a DAG (lazy imports inside functions are
    for optional runtimes: torch, onnxruntime's transformers optimizer, TVM)."""
    modules = {_module(p): p for p in CORE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target in _imports(path, top_level_only=True):
            if target in modules and target != name:
                graph.add_edge(name, target)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, cycles


def test_core_never_imports_a_pass_family():
    """Anywhere in the core, at any depth: families register themselves (graphopt/families.py
    names the built-in ones for the registries to import)."""
    offenders = {_module(p): sorted(t for t in _imports(p, top_level_only=False) if t.startswith("graphopt.passes"))
                 for p in CORE.rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_every_family_registers_through_the_registry():
    from graphopt import functions, registry

    registry.ensure_builtin()
    assert {"fuse-attention", "fuse-norms", "merge-branches"} <= {p.name for p in registry.available()}
    assert registry.approximate_step("mixer").__name__ == "SwapMixers"
    assert set(registry.targets()) >= {"ort-cpu", "ort-cuda"}
    assert {"Gelu", "MaskedAttention", "LinearAttentionHedgehogCausal", "WindowAttentionBanded"} <= set(functions.LIBRARY)
