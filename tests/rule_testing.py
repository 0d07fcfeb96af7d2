"""Helpers the rule tests share: build a model from ONNX text with seeded
initializers, apply one pass, check equivalence and explanations."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.checker
import onnx.parser

import graphopt
from graphopt import exporters, registry


def header(opset: int = 21, extra: str = "") -> str:
    return f'<ir_version: 10, opset_import: ["" : {opset}{extra}]>\n'


def build(text: str, seed: int = 0, **shapes) -> graphopt.Model:
    """Parse `text`; initializers named in `shapes` get seeded values (names starting with
    'var' are positive, as variances must be)."""
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        values = rng.standard_normal(shape).astype(np.float32)
        if name.startswith("var"):
            values = np.abs(values) + 0.5
        proto.graph.initializer.append(onnx.numpy_helper.from_array(values, name))
    return graphopt.load(proto)


def apply(name: str, model: graphopt.Model):
    """(rewritten copy, counts) after calling pass `name` on a copy of `model`."""
    work = model.clone()
    return work, registry.get(name)(work.ir)


def ops_of(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def assert_equivalent(original, model, **validate_kwargs):
    result = graphopt.validate(original, model, **validate_kwargs)
    assert result.passed, result.to_dict()
    onnx.checker.check_model(exporters.to_proto(model), full_check=True)
    assert [v.name for v in model.graph.inputs] == [v.name for v in original.graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in original.graph.outputs]


def assert_explained(name: str, model, rule: str, reason: str):
    lines = registry.get(name).near_misses(model.ir)
    assert any(line.startswith(rule) and reason in line for line in lines), lines
