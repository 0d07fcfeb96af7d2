"""Norm fusion: decomposed LayerNorm and RMSNorm into one op, then their affines.

Staged: `FuseLayerNorm` / `FuseRMSNorm` turn the normalization core into a
LayerNormalization / RMSNormalization with unit scale (the standard op where the
model's opset has it, else the graphopt function with the same semantics);
`AbsorbNormAffine` then folds the elementwise scale and shift that follow.
"""

from __future__ import annotations

import numpy as np

from graphopt import functions
from graphopt.ir import MatchResult, ir, pattern
from graphopt.passes._checks import constant_blocker, last_axis_blocker, opset_of, scalar, single_reader_blocker
from graphopt.passes._weights import const_array, new_initializer
from graphopt.registry import register
from graphopt.rewrite import PassKind, Rule, RulePass

LAYER_NORM_OPSET = 17  # LayerNormalization
RMS_NORM_OPSET = 23  # RMSNormalization


def _last_dim(x: ir.Value) -> int | None:
    if x.shape is None or len(x.shape) == 0 or not isinstance(x.shape[-1], int):
        return None
    return x.shape[-1]


def _core_blockers(x: ir.Value, reductions: list[ir.Node], square_base: ir.Value, two, one, eps) -> str | None:
    """Shared preconditions of the normalization cores: constants and the reduced axis."""
    if two is not None and (reason := constant_blocker(two, 2.0, "the exponent")):
        return reason
    if one is not None and (reason := constant_blocker(one, 1.0, "the numerator")):
        return reason
    if (e := scalar(eps)) is None or e < 0:
        return f"epsilon '{eps.name}' is not a non-negative scalar constant"
    for node, data in zip(reductions, (x, square_base)):
        if reason := last_axis_blocker(node, data):
            return reason
    if _last_dim(x) is None:
        return f"the last dimension of '{x.name}' is not static (needed for the norm's scale)"
    return None


def _function_blocker(x: ir.Value, standard_opset: int) -> str | None:
    """When the model's opset lacks the standard op, the graphopt function must be callable on x."""
    opset = opset_of(x)
    return None if opset >= standard_opset else functions.call_blocker(x, opset)


def _inverse_std(op, std, form: str):
    """The three ways exporters divide by the standard deviation (see `variants`)."""
    if form == "reciprocal":
        return op.Reciprocal(std)
    return op.Div(pattern.Var("one"), std)


class FuseLayerNorm(Rule):
    """Fuse the decomposed LayerNorm core into LayerNormalization with unit scale.

    Math (mean and variance over the last axis):
        d = x - mean(x);  y = d / sqrt(mean(d * d) + eps)  =  LayerNormalization(x, 1, 0, eps)
    Forms: d^2 as Pow(d, 2) or Mul(d, d); division as Div(d, std), Mul(d, Reciprocal(std))
    or Mul(d, Div(1, std)). Not fused: eps added outside the square root,
    d / (sqrt(var) + eps), which is a different function.
    Preconditions:
        1. The exponent is 2 and the numerator (if any) is 1.
        2. epsilon is a non-negative scalar constant.
        3. Both ReduceMeans reduce only the last axis and keep it.
        4. The last dimension of x is static.
        5. Below opset 17 (the graphopt function) and opset 15, x is float32.
    """

    commute = True
    variants = ({"form": "div"}, {"form": "reciprocal"}, {"form": "one-over"})

    def pattern(self, op, x, eps):
        d = op.Sub(x, op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"]))
        square = pattern.OrValue([op.Pow(d, pattern.Var("two")), op.Mul(d, d)])
        var = op.ReduceMean(square, _allow_other_inputs=True, _outputs=["var"])
        std = op.Sqrt(op.Add(var, eps))
        if self.form == "div":
            return op.Div(d, std)
        return op.Mul(d, _inverse_std(op, std, self.form))

    def check(self, context, x, eps, mean, var, two=None, one=None, **_):
        result = MatchResult()
        if reason := _core_blockers(x, [mean.producer(), var.producer()], mean.producer().outputs[0], two, one, eps) or _function_blocker(x, LAYER_NORM_OPSET):
            return result.fail(reason, x)
        return result

    def rewrite(self, op, x, eps, **_):
        d = _last_dim(x)
        dtype = x.dtype.numpy() if x.dtype is not None else np.float32
        scale = new_initializer(op, x, np.ones(d, dtype), "ln_scale")
        bias = new_initializer(op, x, np.zeros(d, dtype), "ln_bias")
        if opset_of(x) >= LAYER_NORM_OPSET:
            return op.LayerNormalization(x, scale, bias, axis=-1, epsilon=scalar(eps))
        epsilon = new_initializer(op, x, np.array(scalar(eps), dtype), "ln_eps")  # in x's type: the body adds it to var
        return op.LayerNormalization(x, scale, bias, epsilon, _domain=functions.DOMAIN)


class FuseRMSNorm(Rule):
    """Fuse the decomposed RMSNorm core (Llama, Qwen, Mistral, T5) into RMSNormalization with unit scale.

    Math (over the last axis):
        y = x / sqrt(mean(x * x) + eps)  =  RMSNormalization(x, 1, eps)
    Forms: x^2 as Pow(x, 2) or Mul(x, x); division as Div(x, std), Mul(x, Reciprocal(std))
    or Mul(x, Div(1, std)). A Cast-to-float32 island around it stays outside.
    Preconditions:
        1. The exponent is 2 and the numerator (if any) is 1.
        2. epsilon is a non-negative scalar constant.
        3. The ReduceMean reduces only the last axis and keeps it.
        4. The last dimension of x is static.
        5. Below opset 23 (the graphopt function) and opset 15, x is float32.
    """

    commute = True
    variants = ({"form": "div"}, {"form": "reciprocal"}, {"form": "one-over"})

    def pattern(self, op, x, eps):
        square = pattern.OrValue([op.Pow(x, pattern.Var("two")), op.Mul(x, x)])
        mean = op.ReduceMean(square, _allow_other_inputs=True, _outputs=["mean"])
        std = op.Sqrt(op.Add(mean, eps))
        if self.form == "div":
            return op.Div(x, std)
        return op.Mul(x, _inverse_std(op, std, self.form))

    def check(self, context, x, eps, mean, two=None, one=None, **_):
        result = MatchResult()
        if reason := _core_blockers(x, [mean.producer()], x, two, one, eps) or _function_blocker(x, RMS_NORM_OPSET):
            return result.fail(reason, x)
        return result

    def rewrite(self, op, x, eps, **_):
        d = _last_dim(x)
        dtype = x.dtype.numpy() if x.dtype is not None else np.float32
        scale = new_initializer(op, x, np.ones(d, dtype), "rms_scale")
        if opset_of(x) >= RMS_NORM_OPSET:
            return op.RMSNormalization(x, scale, axis=-1, epsilon=scalar(eps))
        epsilon = new_initializer(op, x, np.array(scalar(eps), np.float32), "rms_eps")
        return op.RMSNormalization(x, scale, epsilon, _domain=functions.DOMAIN)


class AbsorbNormAffine(Rule):
    """Absorb an elementwise scale or shift over the last axis into the norm before it.

    Math (s, b the norm's scale and bias; w, c constants broadcast over the last axis):
        Norm(x; s, b) * w = Norm(x; s * w, b * w)
        Norm(x; s, b) + c = Norm(x; s, b + c)          (LayerNormalization only)
    Preconditions:
        1. The norm normalizes the last axis only and its scale (and bias) are constants.
        2. w (or c) is a constant that varies along the last axis at most.
        3. The norm's output has no other reader.
        4. A shift needs a norm with a bias (LayerNormalization).
    """

    commute = True
    variants = ({"affine": "scale"}, {"affine": "shift"})
    KINDS = ("LayerNormalization", "RMSNormalization", "graphopt.LayerNormalization", "graphopt.RMSNormalization")

    def pattern(self, op, x, s, w):
        norm = pattern.OrValue(
            [op.LayerNormalization(x, s, _allow_other_inputs=True, _allow_other_attributes=True),
             op.RMSNormalization(x, s, _allow_other_attributes=True),
             op.LayerNormalization(x, s, pattern.Var("b"), pattern.Var("e"), _domain=functions.DOMAIN),
             op.RMSNormalization(x, s, pattern.Var("e"), _domain=functions.DOMAIN)],
            name="norm", tag_var="kind", tag_values=self.KINDS,
        )
        return op.Mul(norm, w) if self.affine == "scale" else op.Add(norm, w)

    def check(self, context, x, s, w, norm, kind, **_):
        result = MatchResult()
        node = norm.producer()
        if kind in ("LayerNormalization", "RMSNormalization") and node.attributes.get_int("axis", -1) not in (-1, len(x.shape or ()) - 1):
            return result.fail(f"'{node.name}' normalizes from axis {node.attributes.get_int('axis', -1)}, not the last axis only", node)
        scale = const_array(s)
        bias = self._bias(node, kind)
        if scale is None or (bias is not None and const_array(bias) is None):
            return result.fail(f"the scale or bias of '{node.name}' is not constant", s)
        factor = const_array(w)
        if factor is None or (factor.ndim > 0 and (factor.size != factor.shape[-1] or factor.shape[-1] not in (1, scale.shape[-1]))):
            return result.fail(f"'{w.name}' is not a constant varying along the last axis only", w)
        if reason := single_reader_blocker(norm, context.output_values[0].producer()):
            return result.fail(reason, norm)
        if self.affine == "shift" and "RMS" in kind:
            return result.fail(f"'{node.name}' is an RMSNormalization, which has no bias to absorb a shift", node)
        return result

    @staticmethod
    def _bias(node: ir.Node, kind: str) -> ir.Value | None:
        if "RMS" in kind:
            return None
        return node.inputs[2] if len(node.inputs) > 2 else None

    def rewrite(self, op, x, s, w, norm, kind, **_):
        node = norm.producer()
        scale = const_array(s)
        factor = np.broadcast_to(const_array(w).reshape(-1), scale.shape[-1:]).astype(scale.dtype)
        bias_value = self._bias(node, kind)
        bias = const_array(bias_value) if bias_value is not None else (None if "RMS" in kind else np.zeros_like(scale))
        if self.affine == "scale":
            scale, bias = scale * factor, (None if bias is None else bias * factor)
        else:
            bias = bias + factor
        inputs = [x, new_initializer(op, w, scale, "norm_scale")]
        if bias is not None:
            inputs.append(new_initializer(op, w, bias.astype(scale.dtype), "norm_bias"))
        if kind.startswith("graphopt."):
            inputs.append(node.inputs[-1])  # epsilon
            return getattr(op, node.op_type)(*inputs, _domain=functions.DOMAIN)
        return getattr(op, node.op_type)(*inputs, **dict(node.attributes))


@register
class FuseNorms(RulePass):
    """Fuse decomposed LayerNorm and RMSNorm (every exporter form) and absorb their affines."""

    name = "fuse-norms"
    kind = PassKind.EXACT
    requires_shapes = True  # axis and hidden size checks
    rules = (FuseLayerNorm, FuseRMSNorm, AbsorbNormAffine)
