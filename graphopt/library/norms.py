"""Norms below the opset that has them: LayerNormalization (standard from opset 17) and
RMSNormalization (from 23), with the standard ops' semantics over the last axis."""

from __future__ import annotations

from graphopt.functions import define

LAYER_NORMALIZATION = "LayerNormalization"
RMS_NORMALIZATION = "RMSNormalization"
NORMS = (LAYER_NORMALIZATION, RMS_NORMALIZATION)


@define(RMS_NORMALIZATION, ["x", "scale", "epsilon"])
def rms_normalization(op, c, x, scale, epsilon):
    """y = x / sqrt(mean(x^2) + epsilon) * scale.
    float32 (`plain`): onnxruntime's SimplifiedLayerNormFusion pattern (Pow, no casts), so the
    inlined body fuses; an RMSNorm written with Mul(x, x) and casts was not fused. Otherwise the
    Llama/Qwen/T5 reference: compute in float32, cast back, then scale."""
    if c.plain:
        ms = c.reduce("Mean", op.Pow(x, c.f32(2.0)), [-1])
        return op.Mul(op.Div(x, op.Sqrt(op.Add(ms, epsilon))), scale)
    xf = op.Cast(x, to=1)
    ms = c.reduce("Mean", op.Mul(xf, xf), [-1])
    normed = op.Div(xf, op.Sqrt(op.Add(ms, epsilon)))
    return op.Mul(c.like(normed, x), scale)


@define(LAYER_NORMALIZATION, ["x", "scale", "bias", "epsilon"])
def layer_normalization(op, c, x, scale, bias, epsilon):
    """y = (x - mean(x)) / sqrt(var(x) + epsilon) * scale + bias (LayerNormalization-17)."""
    d = op.Sub(x, c.reduce("Mean", x, [-1]))
    var = c.reduce("Mean", op.Mul(d, d), [-1])
    return op.Add(op.Mul(op.Div(d, op.Sqrt(op.Add(var, epsilon))), scale), bias)
