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


def _package_files(folder: str) -> dict[str, Path]:
    return {_module(p): p for p in (ROOT / folder).rglob("*.py")}


def test_passes_never_import_a_runtime_package():
    """passes/ holds runtime-neutral rewrites only: no import of graphopt.backends at any depth
    (a runtime is reached through registry.runtime)."""
    offenders = {name: sorted(t for t in _imports(p, top_level_only=False) if t.startswith("graphopt.backends"))
                 for name, p in _package_files("passes").items()}
    assert not {k: v for k, v in offenders.items() if v}


def _third_party(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_core_imports_no_runtime_package_or_optional_runtime_at_module_level():
    """The core reaches runtimes through the registry: no module-level import of a backend
    package, of OpenVINO or of TVM (onnxruntime, which every check needs, is core)."""
    offenders = {}
    for name, path in {_module(p): p for p in CORE.rglob("*.py")}.items():
        bad = sorted(t for t in _imports(path, top_level_only=True) if t.startswith("graphopt.backends"))
        bad += sorted(_third_party(path, top_level_only=True) & {"openvino", "tvm", "nncf"})
        if bad:
            offenders[name] = bad
    assert not offenders


def test_each_runtime_is_one_package_behind_the_runtime_interface():
    from graphopt import registry, runtimes

    assert registry.runtimes() == ["onnxruntime", "openvino", "tvm"]
    for name in registry.runtimes():
        runtime = registry.runtime(name)
        module = type(runtime).__module__
        assert module == f"graphopt.backends.{ {'onnxruntime': 'ort'}.get(name, name) }", module
        assert set(runtime.precisions) <= set(runtimes.PRECISIONS) and "fp32" in runtime.precisions
        assert all(registry.get(p) for p in runtime.lowering)  # its lowering passes are registered
        assert callable(runtime.compile) and callable(runtime.supports) and isinstance(runtime.needs_shapes, bool)
    # the lowering rewrites live with their runtime, not in passes/
    assert registry.get("lower-attention-mha").__module__ == "graphopt.backends.ort.lowering"
    assert registry.get("heads-first-keys").__module__ == "graphopt.backends.openvino.lowering"


def test_a_saved_model_runs_where_its_metadata_says(tmp_path):
    import numpy as np
    import onnx.parser

    import graphopt
    from graphopt import runtimes
    from graphopt.model import PRECISION_KEY, RUNTIME_KEY

    model = graphopt.load(onnx.parser.parse_model(
        '<ir_version: 10, opset_import: ["" : 17]>\ng (float[2, 3] x) => (float[2, 3] y) { y = Relu(x) }'))
    assert runtimes.runtime_for(model)[0].name == "onnxruntime"
    model.ir.metadata_props[RUNTIME_KEY] = "openvino"
    model.ir.metadata_props[PRECISION_KEY] = "fp32"
    path = graphopt.save(model, tmp_path / "m.onnx")
    runtime, precision = runtimes.runtime_for(path)
    assert (runtime.name, precision) == ("openvino", "fp32")
    x = np.array([[-1, 0, 2], [3, -4, 5]], np.float32)
    np.testing.assert_array_equal(runtimes.executable_for(path).run({"x": x})["y"], np.maximum(x, 0))


def test_every_package_directory_is_installed():
    """A wheel holds only the packages pyproject.toml lists: every directory with an __init__.py
    under graphopt/, passes/ and backends/ is one of them (graphopt.passes.prune was once missed:
    the editable install hid it)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in (("graphopt", "graphopt"), ("passes", "graphopt.passes"), ("backends", "graphopt.backends")):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *parts)))
    assert found - listed == set(), "add these to [tool.setuptools] packages"
