"""Norm fusion: decomposed LayerNorm and RMSNorm into one op, then their affines.

Staged: `FuseLayerNorm` / `FuseRMSNorm` turn the normalization core into a
LayerNormalization / RMSNormalization with unit scale (the standard op where the
model's opset has it, else the graphopt function with the same semantics);
`AbsorbNormAffine` then folds the elementwise scale and shift that follow.
"""

from __future__ import annotations

import numpy as np

from graphopt import functions, ops
from graphopt.ir import MatchResult, ir, pattern
from graphopt.passes._edits import append_add
from graphopt.passes._checks import constant_blocker, last_axis_blocker, opset_of, reduced_axes, scalar, single_reader_blocker
from graphopt.passes._weights import add_initializer, const_array, new_initializer
from graphopt.registry import register
from graphopt.rewrite import RULE_TAG, Pass, PassKind, Rule, RulePass

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


class SumToMean(Rule):
    """A sum over axes times one over their size is the mean (jax2tf writes every mean so).

    Math (n the product of x's dims over the reduced axes A):
        ReduceSum(x, A) * (1 / n) = ReduceSum(x, A) / n = ReduceMean(x, A)
    Preconditions:
        1. The axes are constants (not empty) and x's dims over them are static.
        2. The factor is a scalar constant equal to 1 / n (or the divisor to n).
    """

    commute = True
    variants = ({"op": "Mul"}, {"op": "Div"})

    def pattern(self, op, x, factor):
        total = op.ReduceSum(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["total"])
        return op.Mul(total, factor) if self.op == "Mul" else op.Div(total, factor)

    def check(self, context, x, factor, total, **_):
        result = MatchResult()
        axes = self._axes(total.producer(), x)
        if axes is None:
            return result.fail(f"ReduceSum '{total.producer().name}' has no constant axes over static dims", x)
        n = float(np.prod([x.shape[a] for a in axes]))
        if reason := constant_blocker(factor, 1 / n if self.op == "Mul" else n, "the factor"):
            return result.fail(reason, factor)
        return result

    @staticmethod
    def _axes(node: ir.Node, x: ir.Value) -> list[int] | None:
        axes = reduced_axes(node)
        return list(axes) if axes is not None and all(isinstance(x.shape[a], int) for a in axes) else None

    def rewrite(self, op, x, factor, total, **_):
        node = total.producer()
        keepdims = node.attributes.get_int("keepdims", 1)
        if opset_of(x) >= 18:
            return op.ReduceMean(x, node.inputs[1], keepdims=keepdims)
        return op.ReduceMean(x, axes=self._axes(node, x), keepdims=keepdims)


class FuseLayerNorm(Rule):
    """Fuse the decomposed LayerNorm core into LayerNormalization with unit scale.

    Math (mean and variance over the last axis, m = mean(x)):
        d = x - m;  y = d / sqrt(var + eps)  =  LayerNormalization(x, 1, 0, eps)
        var = mean(d * d), or the moments form Flax writes: max(mean(x * x) - m * m, 0)
        (the same in exact arithmetic; onnxruntime's kernel computes it so)
    Forms: squares as Pow(., 2) or Mul(., .); division as Div(d, std), Mul(d, Reciprocal(std))
    or Mul(d, Div(1, std)); with `scaled`, the scale multiplied into the inverse first,
    d * (Reciprocal(std) * w) (jax2tf), fused with w as the norm's scale. Not fused: eps added
    outside the square root, d / (sqrt(var) + eps), which is a different function.
    Preconditions:
        1. The exponent is 2, the numerator (if any) 1 and the clamp (if any) 0.
        2. epsilon is a non-negative scalar constant.
        3. Both ReduceMeans reduce only the last axis and keep it.
        4. The last dimension of x is static.
        5. Below opset 17 (the graphopt function) and opset 15, x is float32.
        6. A scale multiplied into the inverse is a constant varying along the last axis only.
    """

    commute = True
    variants = tuple({"form": form, "scaled": False} for form in ("div", "reciprocal", "one-over")) + (
        {"form": "reciprocal", "scaled": True},)

    def pattern(self, op, x, eps):
        mean = op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"])
        d = op.Sub(x, mean)
        centered = op.ReduceMean(pattern.OrValue([op.Pow(d, pattern.Var("two")), op.Mul(d, d)]), _allow_other_inputs=True)
        moments = op.Sub(op.ReduceMean(pattern.OrValue([op.Pow(x, pattern.Var("two")), op.Mul(x, x)]), _allow_other_inputs=True),
                         pattern.OrValue([op.Pow(mean, pattern.Var("two_m")), op.Mul(mean, mean)]))
        zero = pattern.Var("zero")
        var = pattern.OrValue([centered, moments, op.Max(moments, zero), op.Max(zero, moments)],
                                name="var", tag_var="variance", tag_values=("centered", "moments", "clamped", "clamped"))
        std = op.Sqrt(op.Add(var, eps))
        if self.form == "div":
            return op.Div(d, std)
        if self.scaled:
            return op.Mul(d, op.Mul(op.Reciprocal(std), pattern.Var("w")))
        return op.Mul(d, _inverse_std(op, std, self.form))

    def check(self, context, x, eps, mean, var, two=None, one=None, **bound):
        result = MatchResult()
        square = self._second_moment(var)
        base = mean.producer().outputs[0] if square.producer().inputs[0] is not x else x
        if reason := (_core_blockers(x, [mean.producer(), square.producer()], base, two, one, eps)
                      or (bound.get("two_m") is not None and constant_blocker(bound["two_m"], 2.0, "the exponent"))
                      or (bound.get("zero") is not None and constant_blocker(bound["zero"], 0.0, "the clamp"))
                      or _function_blocker(x, LAYER_NORM_OPSET)):
            return result.fail(reason, x)
        if self.scaled:
            w = const_array(bound["w"])
            if w is None or (w.ndim > 0 and (w.size != w.shape[-1] or w.shape[-1] not in (1, _last_dim(x)))):
                return result.fail(f"'{bound['w'].name}' is not a constant varying along the last axis only", bound["w"])
        return result

    @staticmethod
    def _second_moment(var: ir.Value) -> ir.Value:
        """The ReduceMean of squares inside the variance (centered, moments or clamped moments)."""
        node = var.producer()
        if node.op_type == "Max":  # Max(moments, 0) in either order
            node = next(v.producer() for v in node.inputs if v.producer() is not None and v.producer().op_type == "Sub")
        if node.op_type == "Sub":
            node = node.inputs[0].producer()
        return node.outputs[0]

    def rewrite(self, op, x, eps, **bound):
        d = _last_dim(x)
        dtype = x.dtype.numpy() if x.dtype is not None else np.float32
        scale = np.ones(d, dtype)
        if self.scaled:
            scale = np.broadcast_to(const_array(bound["w"]).reshape(-1), (d,)).astype(dtype)
        scale = new_initializer(op, x, scale, "ln_scale")
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


class FoldCastIslandIntoNorm(Rule):
    """Fold a float32 island (Cast up, unit-affine norm, Cast back) into a norm on the narrow type.

    Math (ONNX LayerNormalization-17 / RMSNormalization-23 normalize in float32, stash_type 1,
    then cast to the input type; graphopt's RMSNormalization body does the same):
        Cast_T(Norm(Cast_f32(x_T); 1, 0)) = Norm(x_T; 1_T, 0_T)
    Preconditions:
        1. The inner Cast is to float32 and the outer Cast back to x's own type (float16 or bfloat16).
        2. The norm has unit scale and zero bias (as FuseLayerNorm / FuseRMSNorm produce), and for
           LayerNormalization computes in float32 (stash_type 1).
        3. The float32 values are read only inside the island.
    """

    KINDS = ("LayerNormalization", "RMSNormalization", "graphopt.RMSNormalization")

    def pattern(self, op, x, s, to):
        xf = op.Cast(x, to=ir.DataType.FLOAT.value, _outputs=["xf"])
        norm = pattern.OrValue(
            [op.LayerNormalization(xf, s, _allow_other_inputs=True, _allow_other_attributes=True),
             op.RMSNormalization(xf, s, _allow_other_attributes=True),
             op.RMSNormalization(xf, s, pattern.Var("e"), _domain=functions.DOMAIN)],
            name="norm", tag_var="kind", tag_values=self.KINDS,
        )
        return op.Cast(norm, to=to)

    def check(self, context, x, s, to, norm, kind, **_):
        result = MatchResult()
        narrow = (ir.DataType.FLOAT16.value, ir.DataType.BFLOAT16.value)
        if x.dtype is None or x.dtype.value != to.as_int() or to.as_int() not in narrow:
            return result.fail(f"the island does not cast back to '{x.name}''s own float16/bfloat16 type", x)
        node = norm.producer()
        scale = const_array(s)
        bias = const_array(node.inputs[2]) if kind == "LayerNormalization" and len(node.inputs) > 2 and node.inputs[2] is not None else None
        if scale is None or np.any(scale != 1) or (bias is not None and np.any(bias != 0)):
            return result.fail(f"'{node.name}' has an affine inside the float32 island", node)
        if kind == "LayerNormalization" and node.attributes.get_int("stash_type", 1) != 1:
            return result.fail(f"'{node.name}' does not compute in float32", node)
        return result

    def rewrite(self, op, x, s, to, norm, kind, **_):
        node = norm.producer()
        d = const_array(s).shape[-1]
        dtype = x.dtype.numpy()
        scale = new_initializer(op, s, np.ones(d, dtype), "narrow")
        if kind == "LayerNormalization":
            return op.LayerNormalization(x, scale, new_initializer(op, s, np.zeros(d, dtype), "narrow_bias"), **dict(node.attributes))
        if kind == "RMSNormalization":
            return op.RMSNormalization(x, scale, **dict(node.attributes))
        return op.RMSNormalization(x, scale, node.inputs[2], _domain=functions.DOMAIN)


@register
class FuseNorms(RulePass):
    """Fuse decomposed LayerNorm and RMSNorm (every exporter form) and absorb their affines."""

    name = "fuse-norms"
    kind = PassKind.EXACT
    requires_shapes = True  # axis and hidden size checks
    rules = (SumToMean, FuseLayerNorm, FuseRMSNorm, FoldCastIslandIntoNorm, AbsorbNormAffine)


def _linear_readers(value: ir.Value) -> list[tuple[ir.Node, ir.Node | None]] | str:
    """Every reader of `value` as (MatMul or Gemm reading it as input 0, bias Add or None),
    looking through Reshapes that keep the last dim; or the reason one is not linear."""
    readers = []
    for node, index in value.uses():
        if (node.domain, node.op_type) in ops.SHAPE_ONLY_READERS:
            continue  # the fold changes values, not shapes
        if node.domain == "" and node.op_type == "Reshape" and index == 0:
            out = node.outputs[0]
            if out.is_graph_output():
                return f"Reshape '{node.name}' of it is a graph output"
            if value.shape is None or out.shape is None or out.shape[-1] != value.shape[-1] or not isinstance(out.shape[-1], int):
                return f"Reshape '{node.name}' may change the last dimension"
            inner = _linear_readers(out)
            if isinstance(inner, str):
                return inner
            readers += inner
            continue
        if node.domain != "" or node.op_type not in ("MatMul", "Gemm") or index != 0:
            return f"'{value.name}' is read by {node.op_type} '{node.name}', which is not a linear layer on its last axis"
        weight = const_array(node.inputs[1])
        if weight is None or weight.ndim != 2 or (node.op_type == "Gemm" and node.attributes.get_int("transA", 0)):
            return f"{node.op_type} '{node.name}' has no constant 2-D weight"
        uses = list(node.outputs[0].uses())
        add = uses[0][0] if len(uses) == 1 and uses[0][0].op_type == "Add" and uses[0][0].domain == "" else None
        if add is not None and const_array(add.inputs[1 - uses[0][1]]) is None:
            add = None
        readers.append((node, add))
    return readers


@register
class FoldNormAffineIntoLinear(Pass):
    """Fold a LayerNorm/RMSNorm scale and bias into the linear layers that read it.

    Math (gamma, beta the norm's affine; W, b each reader's weight and bias):
        Norm(x; gamma, beta) W + b = Norm(x; 1, 0) (diag(gamma) W) + (beta W + b)
    Preconditions:
        1. The norm normalizes the last axis only; gamma (and beta) are constants.
        2. Every reader is a MatMul/Gemm with a constant 2-D weight taking the norm output as
           its input (through Reshapes that keep the last dimension).
        3. The norm output is not a graph output, and the norm's affine is not already 1 and 0.
    """

    name = "fold-norm-affine"
    kind = PassKind.EXACT
    requires_shapes = True  # Reshapes must keep the last dimension
    RULE = "FoldNormAffineIntoLinear"
    NORMS = (("", "LayerNormalization"), ("", "RMSNormalization"), (functions.DOMAIN, "LayerNormalization"), (functions.DOMAIN, "RMSNormalization"))

    def run(self, model: ir.Model) -> dict[str, int]:
        folded = 0
        for node, readers in self._candidates(model.graph):
            if not isinstance(readers, str):
                self._fold(model.graph, node, readers)
                folded += 1
        return {self.RULE: folded}

    def explain(self, model: ir.Model) -> list[str]:
        return [f"{self.RULE}: {node.op_type} '{node.name}': {reason}" for node, reason in self._candidates(model.graph) if isinstance(reason, str)]

    def _candidates(self, graph: ir.Graph):
        for node in list(graph):
            if (node.domain, node.op_type) not in self.NORMS:
                continue
            out = node.outputs[0]
            if node.domain == "" and node.attributes.get_int("axis", -1) not in (-1, len((out.shape or ()) ) - 1):
                yield node, "it normalizes more than the last axis"
                continue
            gamma, beta = const_array(node.inputs[1]), self._bias(node)
            if gamma is None or (beta is not None and isinstance(beta, str)):
                yield node, "its scale or bias is not constant"
                continue
            if np.all(gamma == 1) and (beta is None or np.all(beta == 0)):
                continue  # nothing to fold
            if out.is_graph_output():
                yield node, f"'{out.name}' is a graph output"
                continue
            readers = _linear_readers(out)
            yield node, (readers or f"'{out.name}' has no linear reader to absorb the affine")

    @staticmethod
    def _bias(node: ir.Node):
        if node.op_type == "RMSNormalization" or len(node.inputs) < 3 or node.inputs[2] is None:
            return None
        bias = const_array(node.inputs[2])
        return "not constant" if bias is None else bias

    def _fold(self, graph: ir.Graph, node: ir.Node, readers) -> None:
        gamma = const_array(node.inputs[1]).astype(np.float64)
        beta = self._bias(node)
        beta = None if beta is None else beta.astype(np.float64)
        dtype = const_array(node.inputs[1]).dtype
        for linear, add in readers:
            weight = const_array(linear.inputs[1]).astype(np.float64)
            trans_b = linear.op_type == "Gemm" and linear.attributes.get_int("transB", 0) == 1
            w = weight.T if trans_b else weight  # [K, N]
            new_w = gamma[:, None] * w
            linear.replace_input_with(1, add_initializer(graph, linear.inputs[1], (new_w.T if trans_b else new_w).astype(dtype), "normfold"))
            if beta is None:
                continue
            shift = beta @ w  # [N]
            if linear.op_type == "Gemm":
                scale = linear.attributes.get_float("alpha", 1.0)
                old = const_array(linear.inputs[2]) if len(linear.inputs) > 2 and linear.inputs[2] is not None else np.zeros(shift.shape)
                c = old.astype(np.float64) * linear.attributes.get_float("beta", 1.0) + scale * shift
                linear.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
                value = add_initializer(graph, linear.inputs[1], c.astype(dtype), "normfold_bias")
                if len(linear.inputs) > 2:
                    linear.replace_input_with(2, value)
                else:
                    linear.resize_inputs(3)
                    linear.replace_input_with(2, value)
            elif add is not None:
                i = 0 if const_array(add.inputs[0]) is not None else 1
                add.replace_input_with(i, add_initializer(graph, add.inputs[i], (const_array(add.inputs[i]) + shift).astype(dtype), "normfold"))
            else:
                append_add(graph, linear, add_initializer(graph, linear.inputs[1], shift.astype(dtype), "normfold_bias"))
            linear.metadata_props[RULE_TAG] = self.RULE
        node.replace_input_with(1, add_initializer(graph, node.inputs[1], np.ones_like(gamma).astype(dtype), "unit"))
        if beta is not None:
            node.replace_input_with(2, add_initializer(graph, node.inputs[2], np.zeros_like(beta).astype(dtype), "zero"))

