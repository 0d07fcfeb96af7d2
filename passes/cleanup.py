"""Cleanup: constant folding, identity elimination, CSE, dead-code elimination.

Folding, CSE and dead-code removal reuse onnxscript's folder and onnx_ir's
passes; identity elimination is written as rules so `--explain` can say why a
no-op was kept.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import MatchResult, common_passes, ir, onnxscript_optimizer
from graphopt.passes._weights import add_initializer, const_array
from graphopt.passes._checks import forwarding_blocker
from graphopt.summary import count_nodes
from graphopt.registry import register
from graphopt.rewrite import RULE_TAG, Pass, PassKind, Rule, RulePass


@register
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constant and store their results as initializers."""

    name = "fold-constants"
    kind = PassKind.EXACT

    def run(self, model: ir.Model) -> dict[str, int]:
        before = count_nodes(model)
        onnxscript_optimizer.fold_constants(model)  # skips random ops and control flow bodies it cannot prove
        common_passes.RemoveUnusedNodesPass()(model)
        return {"FoldConstants": max(before - count_nodes(model), 0)}


class RemoveIdentity(Rule):
    """Identity(x) = x.

    Preconditions:
        1. x is not a graph input or initializer, and not both x and the result are graph outputs.
    """

    def pattern(self, op, x):
        return op.Identity(x)

    def check(self, context, x, **_):
        result = MatchResult()
        if reason := forwarding_blocker(x, context.output_values[0]):
            return result.fail(reason, x)
        return result

    def rewrite(self, op, x):
        return x


class RemoveSameTypeCast(Rule):
    """Cast(x, to=T) = x when x already has element type T.

    Preconditions:
        1. The element type of x is known and equals `to`.
        2. x is not a graph input or initializer, and not both x and the result are graph outputs.
    """

    def pattern(self, op, x, to):
        return op.Cast(x, to=to)

    def check(self, context, x, to, **_):
        result = MatchResult()
        if x.dtype is None or x.dtype.value != to.as_int():
            return result.fail(f"'{x.name}' has element type {x.dtype}, Cast makes {ir.DataType(to.as_int())}", x)
        if reason := forwarding_blocker(x, context.output_values[0]):
            return result.fail(reason, x)
        return result

    def rewrite(self, op, x, to):
        return x


class RemoveIdentityTranspose(Rule):
    """Transpose(x, perm=[0, 1, ..., n-1]) = x.

    Preconditions:
        1. `perm` is given and is the identity permutation.
        2. x is not a graph input or initializer, and not both x and the result are graph outputs.
    """

    def pattern(self, op, x, perm):
        return op.Transpose(x, perm=perm)

    def check(self, context, x, perm, **_):
        result = MatchResult()
        if perm.is_ref() or list(perm.as_ints()) != list(range(len(perm.as_ints()))):
            return result.fail("perm is not the identity permutation", x)
        if reason := forwarding_blocker(x, context.output_values[0]):
            return result.fail(reason, x)
        return result

    def rewrite(self, op, x, perm):
        return x


class RemoveUnitFactor(Rule):
    """x * 1 = 1 * x = x / 1 = x (exact in IEEE arithmetic, signed zeros and NaNs included).

    Paddle writes swish as x * sigmoid(x * 1.0), which hides the SiLU.
    Preconditions:
        1. The factor is a constant with every element 1 and a single element.
        2. Broadcasting does not grow x: the factor's rank is at most x's (known) rank.
        3. x is not a graph input or initializer, and not both x and the result are graph outputs.
    """

    commute = True
    variants = ({"op": "Mul"}, {"op": "Div"})

    def pattern(self, op, x, one):
        return op.Mul(x, one) if self.op == "Mul" else op.Div(x, one)

    def check(self, context, x, one, **_):
        result = MatchResult()
        factor = const_array(one)
        if factor is None or factor.size != 1 or factor.reshape(-1)[0] != 1:
            return result.fail(f"'{one.name}' is not a constant 1", one)
        rank = None if x.shape is None else len(x.shape)
        if factor.ndim > 0 and (rank is None or factor.ndim > rank):
            return result.fail(f"multiplying by '{one.name}' (rank {factor.ndim}) may add a dimension to '{x.name}'", x)
        if x.dtype is not None and one.dtype is not None and x.dtype != one.dtype:
            return result.fail(f"'{one.name}' has type {one.dtype}, '{x.name}' {x.dtype}", one)
        if reason := forwarding_blocker(x, context.output_values[0]):
            return result.fail(reason, x)
        return result

    def rewrite(self, op, x, one):
        return x


@register
class EliminateIdentity(RulePass):
    """Remove Identity nodes, Casts to the same type, identity Transposes and unit factors."""

    name = "eliminate-identity"
    kind = PassKind.EXACT
    requires_shapes = True  # RemoveSameTypeCast compares element types, RemoveUnitFactor ranks
    rules = (RemoveIdentity, RemoveSameTypeCast, RemoveIdentityTranspose, RemoveUnitFactor)


@register
class EliminateCommonSubexpressions(Pass):
    """Merge nodes that compute the same op on the same inputs (random ops excluded)."""

    name = "cse"
    kind = PassKind.EXACT

    def run(self, model: ir.Model) -> dict[str, int]:
        before = count_nodes(model)
        common_passes.CommonSubexpressionEliminationPass()(model)
        return {"MergeCommonSubexpressions": max(before - count_nodes(model), 0)}


@register
class EliminateDeadCode(Pass):
    """Remove nodes, initializers and functions that no graph output depends on."""

    name = "eliminate-dead-code"
    kind = PassKind.EXACT

    def run(self, model: ir.Model) -> dict[str, int]:
        nodes, initializers, functions = count_nodes(model), len(model.graph.initializers), len(model.functions)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.RemoveUnusedFunctionsPass()(model)
        return {
            "RemoveDeadNodes": nodes - count_nodes(model),
            "RemoveDeadInitializers": initializers - len(model.graph.initializers),
            "RemoveDeadFunctions": functions - len(model.functions),
        }


@register
class ReadShapesFromInputs(Pass):
    """Read a Shape from the graph input that declares the same dims, not from an activation.

    Math: under the model's declared input shapes, a dim named N is one runtime value
    wherever it appears, so Shape(x)[i] = Shape(input)[j] when x's inferred dim i and the
    input's declared dim j carry the same name (and static dims are constants).
    Preconditions:
        1. Every dim Shape reads is static or a named dim that some graph input declares.
    Why: exporters compute reshape targets from activations; after a rewrite replaces the
    computation, those Shape reads would keep the old activations (and their MatMuls) alive.
    """

    name = "read-shapes-from-inputs"
    kind = PassKind.EXACT
    requires_shapes = True
    RULE = "ReadShapeFromInput"

    def run(self, model: ir.Model) -> dict[str, int]:
        graph = model.graph
        declared = {}
        for value in graph.inputs:
            for axis, dim in enumerate(value.shape or ()):
                if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value not in declared:
                    declared[dim.value] = (value, axis)
        done = 0
        for node in list(graph):
            if node.op_type != "Shape" or node.domain != "" or node.inputs[0].is_graph_input():
                continue
            parts = self._parts(node, declared)
            if parts is None:
                continue
            new, pieces = [], []
            for part in parts:
                if isinstance(part, int):
                    pieces.append(add_initializer(graph, node.outputs[0], np.array([part], dtype=np.int64), "dim"))
                else:
                    source, axis = part
                    shape = ir.node("Shape", [source], attributes={"start": axis, "end": axis + 1})
                    new.append(shape)
                    pieces.append(shape.outputs[0])
            if len(pieces) == 1 and new:
                result = pieces[0]
            else:
                concat = ir.node("Concat", pieces, attributes={"axis": 0})
                new.append(concat)
                result = concat.outputs[0]
            for n in new:
                n.metadata_props[RULE_TAG] = self.RULE
            graph.insert_before(node, new)
            result.type, result.shape = node.outputs[0].type, node.outputs[0].shape
            if node.outputs[0].is_graph_output():
                continue
            node.outputs[0].replace_all_uses_with(result)
            done += 1
        if done:
            common_passes.RemoveUnusedNodesPass()(model)
        return {self.RULE: done}

    @staticmethod
    def _parts(node: ir.Node, declared) -> list | None:
        shape = node.inputs[0].shape
        if shape is None:
            return None
        rank = len(shape)
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", rank)
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        parts = []
        for dim in list(shape)[max(start, 0):min(end, rank)]:
            if isinstance(dim, int):
                parts.append(dim)
            elif dim.value in declared:
                parts.append(declared[dim.value])
            else:
                return None
        return parts or None
