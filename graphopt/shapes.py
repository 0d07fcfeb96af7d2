"""ONNX shape inference merged into the IR, in place.

onnx_ir 1.1's ShapeInferencePass merges only the element dtype of each inferred
value, which turns sequence-typed values (seq(tensor(float))) into tensors and
makes such models unloadable. This merge copies whole types, only where the IR
has none, and shapes only of tensor-typed values.
"""

from __future__ import annotations

import logging

import onnx

from graphopt.ir import ir, onnx_api_call
from graphopt.model import fingerprint

logger = logging.getLogger(__name__)


INFERRED = "graphopt.shapes_inferred_for"  # model.meta: the structure shapes were last inferred for


def infer_shapes(model: ir.Model) -> bool:
    """Best effort: on failure log and leave the model unchanged. Returns whether anything changed.
    A model whose structure and input types have not changed since the last inference is not
    inferred again (passes that need shapes run back to back on a 3,600-node model: 0.6 s each)."""
    key = (fingerprint(model), tuple((v.name, str(v.type), str(v.shape)) for v in model.graph.inputs))
    if model.meta.get(INFERRED) == key:
        return False
    model.meta[INFERRED] = key
    try:
        inferred = ir.serde.deserialize_model(onnx_api_call(lambda p: onnx.shape_inference.infer_shapes(p, data_prop=True), model))
    except Exception as exc:  # exotic models can trip onnx's shape inference
        logger.warning("shape inference failed, rules see fewer shapes: %s", exc)
        return False
    changed = False
    for graph, inferred_graph in zip(model.graphs(), inferred.graphs()):
        known = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            found = known.get(name)
            if found is None or found.type is None:
                continue
            if value.type is None:
                value.type = found.type
                changed = True
            if (isinstance(value.type, ir.TensorType) and value.type == found.type
                    and found.shape is not None and value.shape != found.shape):
                value.shape = found.shape
                changed = True
    return changed
