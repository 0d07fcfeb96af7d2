"""Re-parameterization: fold BatchNorm into linear layers, merge parallel branches.

Deploy-time identities of RepVGG, ACB, DBB and MobileOne-style blocks, applied
to any exported graph: a BatchNormalization next to a Conv/ConvTranspose/Gemm/
MatMul becomes part of its weights, and a sum of convolutions (plus identity,
BatchNorm or average-pooling branches) over the same input becomes one Conv.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import MatchResult, ir, pattern
from graphopt.passes._checks import ConvGeometry, inference_batchnorm_blocker, single_reader_blocker
from graphopt.passes._weights import const_array, new_initializer
from graphopt.registry import register
from graphopt.rewrite import PassKind, Rule, RulePass


def _bn_affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) with BN(y) = s * y + t per channel, in float64; None if not constant."""
    params = [const_array(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    s = gamma / np.sqrt(var + bn.attributes.get_float("epsilon", 1e-5))
    return s, beta - mean * s


def _bias(node: ir.Node, index: int, size: int) -> np.ndarray | None:
    """The constant bias input (zeros when absent), or None when it is not constant."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return np.zeros(size)
    b = const_array(node.inputs[index])
    return None if b is None else b.astype(np.float64)


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


def _centre_pad(w: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """Zero-pad the spatial dims of `w` symmetrically up to `kernel`."""
    widths = [(0, 0), (0, 0)] + [((k - n) // 2, (k - n) // 2) for k, n in zip(kernel, w.shape[2:])]
    return np.pad(w, widths)


def _aligned_geometry(a: ConvGeometry, b: ConvGeometry) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
    """(merged kernel, merged pads) when two convs' windows coincide after centre padding, else a reason."""
    if (a.strides, a.dilations, a.group) != (b.strides, b.dilations, b.group):
        return f"strides/dilations/group differ ({a.strides}/{a.dilations}/{a.group} vs {b.strides}/{b.dilations}/{b.group})"
    kernel = tuple(max(ka, kb) for ka, kb in zip(a.kernel, b.kernel))
    pads_begin, pads_end = [], []
    for d, (K, ka, kb) in enumerate(zip(kernel, a.kernel, b.kernel)):
        if (K - ka) % 2 or (K - kb) % 2:
            return f"kernel sizes {a.kernel} and {b.kernel} cannot be centred in one another"
        shift = a.dilations[d]
        ends = {(g.begin[d] + shift * (K - k) // 2, g.end[d] + shift * (K - k) // 2) for g, k in ((a, ka), (b, kb))}
        if len(ends) != 1:
            return f"padding {a.begin + a.end} and {b.begin + b.end} do not align the windows on axis {d}"
        (begin, end), = ends
        pads_begin.append(begin)
        pads_end.append(end)
    return kernel, tuple(pads_begin + pads_end)


class MergeParallelConvs(Rule):
    """Merge two convolutions of the same input that are summed.

    Math (convolution is linear in the kernel; a kernel zero-padded symmetrically
    and padded correspondingly less sees the same windows):
        Conv(x, W1, b1; p1) + Conv(x, W2, b2; p2) = Conv(x, pad(W1) + pad(W2), b1 + b2; p)
    Covers RepVGG 3x3 + 1x1, ACB 3x3 + 1x3 + 3x1, and depthwise multi-kernel branches.
    Preconditions:
        1. Weights and biases are constants, with the same output and per-group input channels.
        2. Same strides, dilations and group.
        3. The kernels centre in one another and the pads make the windows coincide.
        4. Each Conv output has no reader other than the Add.
    """

    commute = True

    def pattern(self, op, x, w1, w2):
        return op.Add(op.Conv(x, w1, _allow_other_inputs=True, _outputs=["c1"]),
                      op.Conv(x, w2, _allow_other_inputs=True, _outputs=["c2"]), _outputs=["out"])

    def check(self, context, x, w1, w2, c1, c2, out, **_):
        result = MatchResult()
        a, b = const_array(w1), const_array(w2)
        if a is None or b is None or _bias(c1.producer(), 2, 1) is None or _bias(c2.producer(), 2, 1) is None:
            return result.fail("a weight or bias of the two Convs is not constant", w1 if a is None else w2)
        if a.shape[:2] != b.shape[:2]:
            return result.fail(f"channel shapes differ: {a.shape[:2]} vs {b.shape[:2]}", w2)
        ga, gb = ConvGeometry(c1.producer(), a.shape[2:]), ConvGeometry(c2.producer(), b.shape[2:])
        for g in (ga, gb):
            if reason := g.explicit_padding_blocker():
                return result.fail(reason, w1)
        aligned = _aligned_geometry(ga, gb)
        if isinstance(aligned, str):
            return result.fail(aligned, w2)
        for conv_out in (c1, c2):
            if reason := single_reader_blocker(conv_out, out.producer()):
                return result.fail(reason, conv_out)
        return result

    def rewrite(self, op, x, w1, w2, c1, c2, out, **_):
        a, b = const_array(w1), const_array(w2)
        first, second = c1.producer(), c2.producer()
        kernel, pads = _aligned_geometry(ConvGeometry(first, a.shape[2:]), ConvGeometry(second, b.shape[2:]))
        weights = _centre_pad(a.astype(np.float64), kernel) + _centre_pad(b.astype(np.float64), kernel)
        bias = _bias(first, 2, a.shape[0]) + _bias(second, 2, a.shape[0])
        attrs = {k: v for k, v in first.attributes.items() if k not in ("pads", "kernel_shape", "auto_pad")}
        return op.Conv(x, new_initializer(op, w1, weights.astype(a.dtype), "merged"),
                       new_initializer(op, w1, bias.astype(a.dtype), "merged_bias"),
                       kernel_shape=list(kernel), pads=list(pads), **attrs)


class AbsorbBranchIntoConv(Rule):
    """Absorb an identity, BatchNorm or average-pooling branch into a parallel Conv.

    Math (each branch is a convolution over the same windows):
        x          = Conv(x, I)                   I[o, o mod C/g, centre] = 1
        BN(x)      = Conv(x, I * s, t)            s, t the BatchNorm affine
        AvgPool(x) = Conv(x, P)                   P[o, o mod C/g, window] = 1 / |window|
        Conv(x, W, b) + branch(x) = Conv(x, W + K_branch, b + b_branch)
    Preconditions:
        1. The Conv has stride 1 and centred 'same' padding, so its output grid is the input grid.
        2. The Conv's output channels equal its input channels, and each group maps channel o to o.
        3. The Conv weight and bias are constants (and for BN: inference mode, constant parameters).
        4. AvgPool: stride 1, count_include_pad (or no pads), window centred in the Conv kernel, dilation 1.
        5. The Conv output has no reader other than the Add.
    """

    commute = True
    BRANCHES = ("batchnorm", "avgpool", "identity")

    def pattern(self, op, x, w):
        # The bare `x` alternative goes last: onnxscript does not backtrack out of an
        # OrValue, and `x` first would bind x to a BatchNorm/AvgPool output.
        branch = pattern.OrValue(
            [op.BatchNormalization(x, _allow_other_inputs=True, _allow_other_attributes=True),
             op.AveragePool(x, _allow_other_attributes=True), x],
            name="branch", tag_var="kind", tag_values=self.BRANCHES,
        )
        return op.Add(op.Conv(x, w, _allow_other_inputs=True, _outputs=["conv_out"]), branch, _outputs=["out"])

    def check(self, context, x, w, conv_out, branch, kind, out, **_):
        result = MatchResult()
        conv = conv_out.producer()
        weights = const_array(w)
        if weights is None or _bias(conv, 2, 1) is None:
            return result.fail(f"the weight or bias of Conv '{conv.name}' is not constant", w)
        geometry = ConvGeometry(conv, weights.shape[2:])
        if reason := geometry.explicit_padding_blocker():
            return result.fail(reason, conv)
        if not geometry.is_same_size():
            return result.fail(f"Conv '{conv.name}' does not keep the spatial grid (stride {geometry.strides}, pads {geometry.begin + geometry.end})", conv)
        c_out, c_in_g = weights.shape[:2]
        if c_out != c_in_g * geometry.group:
            return result.fail(f"Conv '{conv.name}' maps {c_in_g * geometry.group} channels to {c_out}; an identity-like branch needs equal counts", w)
        if kind == "batchnorm":
            bn = branch.producer()
            if reason := inference_batchnorm_blocker(bn):
                return result.fail(reason, bn)
            if _bn_affine(bn) is None:
                return result.fail(f"BatchNormalization '{bn.name}' parameters are not constant", bn)
        if kind == "avgpool" and (reason := self._pool_blocker(branch.producer(), geometry)):
            return result.fail(reason, branch)
        if reason := single_reader_blocker(conv_out, out.producer()):
            return result.fail(reason, conv_out)
        return result

    @staticmethod
    def _pool_blocker(pool: ir.Node, conv: ConvGeometry) -> str | None:
        kernel = tuple(pool.attributes.get_ints("kernel_shape", ()))
        p = ConvGeometry(pool, kernel)
        p.group = conv.group  # pooling is per channel: it fits any grouping of an identity-like Conv
        if reason := p.explicit_padding_blocker():
            return reason
        if any(s != 1 for s in p.strides) or any(d != 1 for d in p.dilations) or any(d != 1 for d in conv.dilations):
            return f"AveragePool '{pool.name}' or the Conv is strided or dilated"
        if (any(p.begin) or any(p.end)) and not pool.attributes.get_int("count_include_pad", 0):
            return f"AveragePool '{pool.name}' excludes padding from its divisor at the borders"
        aligned = _aligned_geometry(conv, p)
        if isinstance(aligned, str) or aligned[0] != conv.kernel:
            return f"AveragePool window {kernel} does not centre in the Conv kernel {conv.kernel} with matching pads"
        return None

    def rewrite(self, op, x, w, conv_out, branch, kind, out, **_):
        conv = conv_out.producer()
        weights = const_array(w)
        c_out, c_in_g = weights.shape[:2]
        kernel = weights.shape[2:]
        extra, extra_bias = np.zeros(weights.shape), np.zeros(c_out)
        local = np.arange(c_out) % c_in_g
        if kind == "avgpool":
            window = tuple(branch.producer().attributes.get_ints("kernel_shape"))
            tap = _centre_pad(np.full((1, 1, *window), 1.0 / np.prod(window)), kernel)[0, 0]
            extra[np.arange(c_out), local] = tap
        else:
            centre = tuple(k // 2 for k in kernel)
            scale, extra_bias = (np.ones(c_out), extra_bias) if kind == "identity" else _bn_affine(branch.producer())
            extra[(np.arange(c_out), local, *centre)] = scale
        new_w = weights.astype(np.float64) + extra
        bias = _bias(conv, 2, c_out) + extra_bias
        return op.Conv(x, new_initializer(op, w, new_w.astype(weights.dtype), "absorbed"),
                       new_initializer(op, w, bias.astype(weights.dtype), "absorbed_bias"), **dict(conv.attributes))


@register
class MergeBranches(RulePass):
    """Merge parallel Conv branches (and identity/BatchNorm/avg-pool branches) summed over one input into one Conv."""

    name = "merge-branches"
    kind = PassKind.EXACT
    rules = (MergeParallelConvs, AbsorbBranchIntoConv)
