"""Activation fusion: GELU (erf and tanh forms) and SiLU, exactly.

Gelu is a standard op from opset 20; below that the graphopt function with the
same reference body is emitted. No approximation is introduced: the erf form
becomes Gelu(approximate="none"), the tanh form Gelu(approximate="tanh").
"""

from __future__ import annotations

import math

from graphopt import functions
from graphopt.ir import MatchResult, pattern
from graphopt.passes._checks import constant_blocker, opset_of
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
    Preconditions:
        1. The constants are 3 (exponent), 0.044715, sqrt(2 / pi), 1 and 0.5.
        2. Below opset 20 (the graphopt function) and opset 15, x is float32.
    """

    commute = True
    variants = ASSOCIATIONS
    requires_ops = ("Tanh",)

    def pattern(self, op, x):
        cube = pattern.OrValue([op.Pow(x, pattern.Var("three")), op.Mul(op.Mul(x, x), x)])
        inner = op.Mul(op.Add(x, op.Mul(cube, pattern.Var("k"))), pattern.Var("c"))
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


@register
class FuseActivations(RulePass):
    """Fuse GELU (erf and tanh forms) into Gelu and x*sigmoid(x) into SiLU, exactly."""

    name = "fuse-activations"
    kind = PassKind.EXACT
    rules = (FuseGelu, FuseGeluTanh, FuseSiLU)
