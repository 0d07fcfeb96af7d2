"""Activations below the opset that has them (Gelu is standard from opset 20), and SiLU."""

from __future__ import annotations

from graphopt.functions import define

GELU = "Gelu"
GELU_TANH = "GeluTanh"
SILU = "SiLU"


@define(GELU, ["x"])
def gelu(op, c, x):
    """y = x (erf(x / sqrt(2)) + 1) / 2. Constants are plain float32 for float32 calls:
    onnxruntime cannot fold CastLike(constant, x) and it hid GELU from its FastGelu fusion."""
    cdf = op.Add(op.Erf(op.Div(x, c.like(c.f32(1.4142135623730951), x))), c.like(c.f32(1.0), x))
    return op.Mul(op.Mul(x, cdf), c.like(c.f32(0.5), x))


@define(GELU_TANH, ["x"])
def gelu_tanh(op, c, x):
    """y = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    inner = op.Add(x, op.Mul(op.Pow(x, c.like(c.f32(3.0), x)), c.like(c.f32(0.044715), x)))
    cdf = op.Add(op.Tanh(op.Mul(inner, c.like(c.f32(0.7978845608028654), x))), c.like(c.f32(1.0), x))
    return op.Mul(op.Mul(x, c.like(c.f32(0.5), x)), cdf)


@define(SILU, ["x"])
def silu(op, c, x):
    """y = x sigmoid(x)."""
    return op.Mul(x, op.Sigmoid(x))
