"""What a model is: inputs, outputs, op histogram, parameters, opsets, size."""

from __future__ import annotations

from collections import Counter
from typing import Any

from graphopt import ops, registry
from graphopt.ir import ir
from graphopt.model import Model
from graphopt.shapes import infer_shapes


def count_nodes(model: ir.Model) -> int:
    """Nodes in the main graph, its subgraphs and the model-local functions."""
    in_graph = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
    return in_graph + sum(len(f) for f in model.functions.values())


def summarize(model: Model, *, attention: bool = False) -> dict[str, Any]:
    """Model statistics; with `attention`, also the attention layers found (runs shape inference on a copy)."""
    m = model.ir
    op_counts = Counter(str(ops.OpId(n.domain, n.op_type)) for n in ir.traversal.RecursiveGraphIterator(m.graph))
    params = [v for g in m.graphs() for v in g.initializers.values() if v.const_value is not None]
    in_constants = constant_weights(m)
    return {
        "inputs": [_value_info(v) for v in m.graph.inputs if not v.is_initializer()],
        "outputs": [_value_info(v) for v in m.graph.outputs],
        "op_counts": dict(sorted(op_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "num_nodes": count_nodes(m),
        "num_params": int(sum(v.const_value.size for v in params)) + int(sum(t.size for t in in_constants)),
        "constant_params": int(sum(t.size for t in in_constants)),  # of num_params: held in Constant nodes
        "param_bytes": model.parameter_bytes(),
        "opsets": {(k or "ai.onnx"): v for k, v in sorted(m.opset_imports.items())},
        "functions": [f"{f.domain}::{f.name}" for f in m.functions.values()],
        "ir_version": m.ir_version,
        "producer": f"{m.producer_name or ''} {m.producer_version or ''}".strip(),
        "source": str(model.source) if model.source else None,
        **({"attention": attention_layers(model)} if attention else {}),
    }


def constant_weights(model: ir.Model) -> list[ir.TensorProtocol]:
    """Weights held in Constant nodes (Paddle and some torch exports write every weight so):
    float tensors of more than one element in a Constant's `value`, in every graph."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if (ops.normalize_domain(node.domain), node.op_type) != ops.CONSTANT or "value" not in node.attributes:
            continue
        tensor = node.attributes["value"].value
        if tensor.dtype.is_floating_point() and tensor.size > 1:
            found.append(tensor)
    return found


def attention_layers(model: Model) -> list[dict[str, Any]]:
    """The attention layers the attention family finds (on a copy with shapes inferred)."""
    work = model.ir.clone()
    infer_shapes(work)
    return registry.analysis("attention")(work.graph)


def _value_info(v: ir.Value) -> dict[str, Any]:
    shape = None if v.shape is None else [d if isinstance(d, int) else (d.value or "?") for d in v.shape]
    return {"name": v.name, "dtype": str(v.dtype.name.lower()) if v.dtype is not None else str(v.type), "shape": shape}


def nonstandard_ops(model: ir.Model) -> Counter:
    """Non-standard ops left in the model (graphopt functions excluded: make-portable inlines
    them), as {"domain::op": count}."""
    found: Counter = Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if ops.normalize_domain(node.domain) not in (*ops.SCHEMA_DOMAINS, ops.GRAPHOPT_DOMAIN):
            found[str(ops.OpId(node.domain, node.op_type))] += 1
    return found


def nonstandard_note(model: ir.Model) -> str | None:
    """A warning naming the non-standard ops a portable model keeps and who runs them."""
    left = nonstandard_ops(model)
    if not left:
        return None
    listed = ", ".join(f"{op} x{n}" for op, n in sorted(left.items()))
    domains = sorted({op.split("::")[0] for op in left})
    who = "; ".join(f"{d}: {ops.RUNTIMES.get(d, 'its own runtime only')}" for d in domains)
    return (f"the portable model keeps non-standard ops with no exact standard form: {listed} ({who}); "
            "other ONNX consumers (OpenVINO, TVM) may not load it")
