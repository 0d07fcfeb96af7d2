"""make-portable: the model in standard ONNX only, for any ONNX consumer (OpenVINO, TVM, other
runtimes), instead of graphopt's model-local functions.

graphopt's passes already write the standard op wherever the model's opset has it (Gelu from
opset 20, LayerNormalization from 17, RMSNormalization from 23); what remains in the graphopt
domain (the canonical attention, ops below their opset, the token mixers) has no standard op,
so its reference body is inlined. Constants are written as `value` tensors, the one form every
consumer's converter reads (TVM's rejects `value_float`). onnxruntime contrib ops, written only
for the ORT targets, are left alone.
"""

from __future__ import annotations

import numpy as np

from graphopt import functions
from graphopt.ir import common_passes, ir
from graphopt.registry import register
from graphopt.rewrite import Pass, PassKind

_SCALAR_CONSTANTS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                     "value_ints": np.int64}


@register
class MakePortable(Pass):
    """Inline every graphopt function call and write Constants as tensors: standard ONNX only."""

    name = "make-portable"
    kind = PassKind.LOWERING

    def run(self, model: ir.Model) -> dict[str, int]:
        calls = sum(1 for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == functions.DOMAIN)
        calls += sum(1 for f in model.functions.values() for n in f if n.domain == functions.DOMAIN)
        if calls:
            common_passes.InlinePass(criteria=lambda f: f.domain == functions.DOMAIN)(model)
            model.opset_imports.pop(functions.DOMAIN, None)
        constants = 0
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type == "Constant" and node.domain == "" and (kind := next(iter(node.attributes), None)) \
                    in _SCALAR_CONSTANTS:
                value = node.attributes[kind].value
                node.attributes.clear()
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.array(value, _SCALAR_CONSTANTS[kind])))
                constants += 1
        return {"InlineGraphoptFunction": calls, "ConstantAsTensor": constants}
