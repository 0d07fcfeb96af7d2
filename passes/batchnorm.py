"""BatchNorm folding: an inference BatchNormalization becomes part of the weights of the
Conv/ConvTranspose/Gemm/MatMul before it, or of the unpadded Conv after it."""

from __future__ import annotations

import numpy as np

from graphopt.ir import MatchResult, ir, pattern
from graphopt.passes._checks import ConvGeometry, inference_batchnorm_blocker, single_reader_blocker
from graphopt.passes._weights import bias_or_zeros as _bias, bn_affine as _bn_affine, const_array, new_initializer
from graphopt.registry import register
from graphopt.rewrite import PassKind, Rule, RulePass


def _channel_view(s: np.ndarray, rank: int, axis: int) -> np.ndarray:
    return s.reshape([-1 if i == axis else 1 for i in range(rank)])


class FoldBatchNormIntoLinear(Rule):
    """Fold an inference BatchNormalization into the linear layer that feeds it.

    Math (per output channel c, s = gamma / sqrt(var + eps), t = beta - mean * s):
        BN(W x + b) = (W * s) x + (b * s + t)
        Conv:          W'[c, ...] = W[c, ...] * s[c]
        ConvTranspose: W'[i, j, ...] = W[i, j, ...] * s[group(i) * C_out/g + j]
        Gemm:          B' = B * s along N; C' = beta * C * s + t; beta' = 1
        MatMul:        W'[:, c] = W[:, c] * s[c], followed by Add(t)
    Preconditions:
        1. The BatchNormalization is in inference mode.
        2. W, the bias (if any), gamma, beta, mean and var are constants.
        3. The linear layer's output has no reader other than the BatchNormalization.
        4. The BatchNorm channel axis is the layer's output-feature axis (for
           MatMul: a rank-2 product; for Gemm: transA/transB are plain flags).
    """

    KINDS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

    def pattern(self, op, x, w, gamma, beta, mean, var):
        linear = pattern.OrValue(
            [op.Conv(x, w, _allow_other_inputs=True), op.ConvTranspose(x, w, _allow_other_inputs=True),
             op.Gemm(x, w, _allow_other_inputs=True), op.MatMul(x, w)],
            name="linear", tag_var="kind", tag_values=self.KINDS,
        )
        return op.BatchNormalization(linear, gamma, beta, mean, var, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x, w, linear, kind, out, **_):
        result = MatchResult()
        bn = out.producer()
        if reason := inference_batchnorm_blocker(bn):
            return result.fail(reason, bn)
        weights = const_array(w)
        if weights is None or _bn_affine(bn) is None:
            return result.fail(f"'{w.name}' or the BatchNorm parameters are not constant", w)
        if kind != "MatMul" and _bias(linear.producer(), 2, 1) is None:
            return result.fail(f"the bias of '{linear.producer().name}' is not constant", linear)
        if reason := single_reader_blocker(linear, bn):
            return result.fail(reason, linear)
        channels = _bn_affine(bn)[0].size
        if kind == "MatMul" and (weights.ndim != 2 or x.shape is None or len(x.shape) != 2):
            return result.fail("MatMul is not a rank-2 product, so BatchNorm's axis 1 is not its feature axis", x)
        if kind == "Gemm" and linear.producer().attributes.get_int("transA", 0) not in (0, 1):
            return result.fail("Gemm transA is not 0/1", linear)
        if _out_channels(kind, linear.producer(), weights) != channels:
            return result.fail(f"BatchNorm has {channels} channels, the layer makes {_out_channels(kind, linear.producer(), weights)}", w)
        return result

    def rewrite(self, op, x, w, linear, kind, out, **_):
        node, bn = linear.producer(), out.producer()
        s, t = _bn_affine(bn)
        weights = const_array(w)
        dtype = weights.dtype
        attrs = dict(node.attributes)
        if kind == "MatMul":
            scaled = op.MatMul(x, new_initializer(op, w, (weights * s[None, :]).astype(dtype), "bnfold"))
            return op.Add(scaled, new_initializer(op, w, t.astype(dtype), "bnfold_bias"))
        if kind == "Gemm":
            trans_b = attrs.get("transB") is not None and attrs["transB"].as_int() == 1
            new_w = weights * (s[:, None] if trans_b else s[None, :])
            c = _bias(node, 2, s.size) * (attrs["beta"].as_float() if "beta" in attrs else 1.0)
            attrs["beta"] = ir.AttrFloat32("beta", 1.0)
            return op.Gemm(x, new_initializer(op, w, new_w.astype(dtype), "bnfold"),
                           new_initializer(op, w, (c * s + t).astype(dtype), "bnfold_bias"), **attrs)
        if kind == "Conv":
            new_w = weights * _channel_view(s, weights.ndim, 0)
        else:  # ConvTranspose: W is [C_in, C_out / g, k...]
            g = attrs["group"].as_int() if "group" in attrs else 1
            grouped = weights.reshape(g, weights.shape[0] // g, *weights.shape[1:])
            new_w = (grouped * s.reshape(g, 1, -1, *([1] * (weights.ndim - 2)))).reshape(weights.shape)
        b = _bias(node, 2, s.size) * s + t
        return getattr(op, kind)(x, new_initializer(op, w, new_w.astype(dtype), "bnfold"),
                                 new_initializer(op, w, b.astype(dtype), "bnfold_bias"), **attrs)


def _out_channels(kind: str, node: ir.Node, w: np.ndarray) -> int:
    if kind == "Conv":
        return w.shape[0]
    if kind == "ConvTranspose":
        return w.shape[1] * node.attributes.get_int("group", 1)
    if kind == "Gemm":
        return w.shape[0] if node.attributes.get_int("transB", 0) else w.shape[-1]
    return w.shape[-1]


class FoldBatchNormIntoNextConv(Rule):
    """Fold an inference BatchNormalization into the Conv that reads it (pre-BN merge).

    Math (s, t as in FoldBatchNormIntoLinear; channel i of the Conv's input):
        Conv(s * x + t, W, b) = Conv(x, W * s[i], b + sum_{i,k} W[o, i, k] * t[i])
    Preconditions:
        1. The BatchNormalization is in inference mode.
        2. W, the bias (if any), gamma, beta, mean and var are constants.
        3. The BatchNorm output has no reader other than the Conv.
        4. The Conv has no padding (zeros padded after BN are not BN of padded zeros).
    """

    def pattern(self, op, x, gamma, beta, mean, var, w):
        normed = op.BatchNormalization(x, gamma, beta, mean, var, _allow_other_attributes=True, _outputs=["normed"])
        return op.Conv(normed, w, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, normed, w, out, **_):
        result = MatchResult()
        bn, conv = normed.producer(), out.producer()
        if reason := inference_batchnorm_blocker(bn):
            return result.fail(reason, bn)
        weights = const_array(w)
        if weights is None or _bn_affine(bn) is None or _bias(conv, 2, 1) is None:
            return result.fail(f"'{w.name}', the Conv bias or the BatchNorm parameters are not constant", w)
        if reason := single_reader_blocker(normed, conv):
            return result.fail(reason, normed)
        geometry = ConvGeometry(conv, weights.shape[2:])
        if geometry.auto_pad not in ("NOTSET", "VALID") or any(geometry.begin) or any(geometry.end):
            return result.fail(f"Conv '{conv.name}' pads its input", conv)
        return result

    def rewrite(self, op, x, normed, w, out, **_):
        bn, conv = normed.producer(), out.producer()
        s, t = _bn_affine(bn)
        weights = const_array(w)
        g = conv.attributes.get_int("group", 1)
        c_out, c_in_g = weights.shape[:2]
        # Input channel index seen by output o, input slot i: group(o) * c_in_g + i.
        index = (np.arange(c_out)[:, None] // (c_out // g)) * c_in_g + np.arange(c_in_g)[None, :]
        spatial = (1,) * (weights.ndim - 2)
        new_w = weights * s[index].reshape(c_out, c_in_g, *spatial)
        b = _bias(conv, 2, c_out) + (weights * t[index].reshape(c_out, c_in_g, *spatial)).reshape(c_out, -1).sum(1)
        return op.Conv(x, new_initializer(op, w, new_w.astype(weights.dtype), "prebn"),
                       new_initializer(op, w, b.astype(weights.dtype), "prebn_bias"), **dict(conv.attributes))


@register
class FoldBatchNorm(RulePass):
    """Fold inference BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it or the Conv after it."""

    name = "fold-batchnorm"
    kind = PassKind.EXACT
    requires_shapes = True  # the MatMul form needs the input rank
    rules = (FoldBatchNormIntoLinear, FoldBatchNormIntoNextConv)
