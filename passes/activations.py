"""Activation fusion: GELU (erf and tanh forms), SiLU and softmax, exactly.

Gelu is a standard op from opset 20; below that the graphopt function with the
same reference body is emitted. No approximation is introduced: the erf form
becomes Gelu(approximate="none"), the tanh form Gelu(approximate="tanh").
"""

from __future__ import annotations

import math

from graphopt import functions
from graphopt.ir import MatchResult, pattern
from graphopt.passes._checks import constant_blocker, opset_of, reduced_axes, scalar
from graphopt.registry import register
from graphopt.rewrite import PassKind, Rule, RulePass

GELU_OPSET = 20
ASSOCIATIONS = ({"association": "x-first"}, {"association": "half-first"}, {"association": "cdf-half"})


def _gelu_product(op, x, cdf, association: str):
    """x * cdf * 0.5 in the three association orders exporters emit."""
    half = pattern.Var("half")
    if association == "x-first":
        return op.Mul(op.Mul(x, cdf), half)
    if association == "half-first":
        return op.Mul(op.Mul(x, half), cdf)
    return op.Mul(x, op.Mul(cdf, half))


def _function_blocker(x) -> str | None:
    return None if opset_of(x) >= GELU_OPSET else functions.call_blocker(x, opset_of(x))


def _constants_blocker(expected: dict[str, float], bound: dict) -> str | None:
    for name, value in expected.items():
        if bound.get(name) is not None and (reason := constant_blocker(bound[name], value, name)):
            return reason
    return None


class FuseGelu(Rule):
    """Fuse the erf form of GELU.

    Math:
        x * 0.5 * (1 + erf(x / sqrt(2)))  =  Gelu(x)           (also x * (1/sqrt(2)) inside erf)
    Preconditions:
        1. The constants are sqrt(2) (or 1/sqrt(2)), 1 and 0.5.
        2. Below opset 20 (the graphopt function) and opset 15, x is float32.
    """

    commute = True
    variants = ASSOCIATIONS
    requires_ops = ("Erf",)

    def pattern(self, op, x):
        scaled = pattern.OrValue([op.Div(x, pattern.Var("root2")), op.Mul(x, pattern.Var("inv_root2"))])
        cdf = op.Add(op.Erf(scaled), pattern.Var("one"))
        return _gelu_product(op, x, cdf, self.association)

    def check(self, context, x, **bound):
        result = MatchResult()
        expected = {"root2": math.sqrt(2), "inv_root2": 1 / math.sqrt(2), "one": 1.0, "half": 0.5}
        if reason := _constants_blocker(expected, bound) or _function_blocker(x):
            return result.fail(reason, x)
        return result

    def rewrite(self, op, x, **_):
        if opset_of(x) >= GELU_OPSET:
            return op.Gelu(x)
        return op.Gelu(x, _domain=functions.DOMAIN)


class FuseGeluTanh(Rule):
    """Fuse the tanh form of GELU (GPT-2's gelu_new).

    Math:
        x * 0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))  =  Gelu(x, approximate="tanh")
    Forms of 0.044715 * x^3: Pow(x, 3) * k, ((x * x) * x) * k, and x * (x * (x * k)) (jax2tf).
    Preconditions:
        1. The constants are 3 (exponent), 0.044715, sqrt(2 / pi), 1 and 0.5.
        2. Below opset 20 (the graphopt function) and opset 15, x is float32.
    """

    commute = True
    # Separate variants, not one OrValue: commuting copies a pattern 2^k times for its k
    # commutative nodes, and alternatives inside one pattern multiply those counts.
    variants = tuple({**association, "cube": cube} for association in ASSOCIATIONS for cube in ("pow", "mul", "nested"))
    requires_ops = ("Tanh",)

    def pattern(self, op, x):
        k = pattern.Var("k")
        if self.cube == "pow":
            cubed = op.Mul(op.Pow(x, pattern.Var("three")), k)
        elif self.cube == "mul":
            cubed = op.Mul(op.Mul(op.Mul(x, x), x), k)
        else:
            cubed = op.Mul(x, op.Mul(x, op.Mul(x, k)))
        inner = op.Mul(op.Add(x, cubed), pattern.Var("c"))
        cdf = op.Add(op.Tanh(inner), pattern.Var("one"))
        return _gelu_product(op, x, cdf, self.association)

    def check(self, context, x, **bound):
        result = MatchResult()
        expected = {"three": 3.0, "k": 0.044715, "c": math.sqrt(2 / math.pi), "one": 1.0, "half": 0.5}
        if reason := _constants_blocker(expected, bound) or _function_blocker(x):
            return result.fail(reason, x)
        return result

    def rewrite(self, op, x, **_):
        if opset_of(x) >= GELU_OPSET:
            return op.Gelu(x, approximate="tanh")
        return op.GeluTanh(x, _domain=functions.DOMAIN)


class FuseSiLU(Rule):
    """Fuse SiLU / Swish-1 (Llama, Qwen and Mistral MLPs) into the graphopt SiLU function.

    Math:
        x * sigmoid(x)  =  SiLU(x)
    Preconditions:
        1. Below opset 15 (no CastLike in the function body), x is float32.
    """

    commute = True
    requires_ops = ("Sigmoid",)

    def pattern(self, op, x):
        return op.Mul(x, op.Sigmoid(x))

    def check(self, context, x, **_):
        result = MatchResult()
        if reason := functions.call_blocker(x, opset_of(x)):
            return result.fail(reason, x)
        return result

    def rewrite(self, op, x):
        return op.SiLU(x, _domain=functions.DOMAIN)


class FuseSoftmax(Rule):
    """Fuse a decomposed softmax (jax2tf, hand-written exports) into Softmax.

    Math (m the maximum of x over axis a, kept):
        e = exp(x - m);  e / sum(e over a)  =  Softmax(x, axis=a)
    Forms: m as ReduceMax(x) or max(ReduceMax(x), -inf) (jax's initial value, either order);
    the division as Div(e, s) or Mul(e, Reciprocal(s)).
    Preconditions:
        1. ReduceMax and ReduceSum reduce the same single axis of x and keep it.
        2. A clamp on the maximum is -inf.
        3. Below opset 13 (Softmax flattened from its axis), the axis is the last.
    """

    commute = True
    variants = tuple({"clamp": clamp, "form": form} for clamp in ("none", "first", "second") for form in ("div", "reciprocal"))
    requires_ops = ("Exp",)

    def pattern(self, op, x):
        peak = op.ReduceMax(x, _allow_other_inputs=True, _outputs=["peak"])
        if self.clamp == "first":
            peak = op.Max(pattern.Var("floor"), peak)
        elif self.clamp == "second":
            peak = op.Max(peak, pattern.Var("floor"))
        e = op.Exp(op.Sub(x, peak))
        total = op.ReduceSum(e, _allow_other_inputs=True, _outputs=["total"])
        return op.Div(e, total) if self.form == "div" else op.Mul(e, op.Reciprocal(total))

    def check(self, context, x, peak, total, floor=None, **_):
        result = MatchResult()
        axes = {reduced_axes(peak.producer()), reduced_axes(total.producer())}
        if len(axes) != 1 or None in axes or len(next(iter(axes))) != 1:
            return result.fail(f"ReduceMax '{peak.producer().name}' and ReduceSum '{total.producer().name}' do not reduce one same axis", x)
        if any(node.attributes.get_int("keepdims", 1) != 1 for node in (peak.producer(), total.producer())):
            return result.fail("a reduction drops the softmax axis", x)
        if floor is not None and scalar(floor) != float("-inf"):
            return result.fail(f"the maximum is clamped at {scalar(floor)!r}, not -inf", floor)
        (axis,) = next(iter(axes))
        if opset_of(x) < 13 and axis != len(x.shape) - 1:
            return result.fail(f"below opset 13 Softmax flattens from its axis; axis {axis} is not the last", x)
        return result

    def rewrite(self, op, x, peak, **_):
        (axis,) = reduced_axes(peak.producer())
        return op.Softmax(x, axis=axis)


@register
class FuseActivations(RulePass):
    """Fuse GELU (erf and tanh forms) into Gelu, x*sigmoid(x) into SiLU and exp(x - max)/sum into Softmax, exactly."""

    name = "fuse-activations"
    kind = PassKind.EXACT
    requires_shapes = True  # FuseSoftmax reads the reduced axis against x's rank
    rules = (FuseGelu, FuseGeluTanh, FuseSiLU, FuseSoftmax)
