"""Re-parameterization: merge parallel and sequential convolution branches into one Conv.

Deploy-time identities of RepVGG, ACB, DBB and MobileOne-style blocks, applied to
any exported graph: a sum of convolutions (plus identity, BatchNorm or average-
pooling branches) over the same input, or a 1x1 -> kxk chain, becomes one Conv.
BatchNorm folding, which these blocks need first, is `passes/batchnorm.py`.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import MatchResult, ir, pattern
from graphopt.passes._checks import ConvGeometry, inference_batchnorm_blocker, single_reader_blocker
from graphopt.passes._weights import bias_or_zeros as _bias, bn_affine as _bn_affine, const_array, new_initializer
from graphopt.registry import register
from graphopt.rewrite import PassKind, Rule, RulePass


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


class MergeSequentialConvs(Rule):
    """Merge a 1x1 convolution into the k x k convolution that reads it (DBB's 1x1 -> kxk branch).

    Math (W1 [M, C], b1 [M]; W2 [O, M, k...], b2 [O]; both group 1):
        Conv(Conv(x, W1, b1), W2, b2) = Conv(x, W, b),  W[o, c] = sum_m W2[o, m] W1[m, c],
        b = b2 + sum_{m, taps} W2[o, m, taps] b1[m]
    Preconditions:
        1. Both are group-1 convolutions with constant weights and biases; the first is 1x1,
           stride 1, unpadded, undilated.
        2. The second pads nothing, or the first has no (or a zero) bias: padding with zeros after
           a biased 1x1 is not the 1x1 of a zero-padded input.
        3. The merge costs no more: C * O <= C * M + M * O per tap (bottlenecks are kept).
        4. The first output has no other reader.
    """

    def pattern(self, op, x, w1, w2):
        return op.Conv(op.Conv(x, w1, _allow_other_inputs=True, _outputs=["mid"]), w2, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, w1, w2, mid, out, **_):
        result = MatchResult()
        first, second = mid.producer(), out.producer()
        a, b = const_array(w1), const_array(w2)
        if a is None or b is None or _bias(first, 2, 1) is None or _bias(second, 2, 1) is None:
            return result.fail("a weight or bias is not constant", w1)
        g1, g2 = ConvGeometry(first, a.shape[2:]), ConvGeometry(second, b.shape[2:])
        if g1.group != 1 or g2.group != 1 or any(k != 1 for k in g1.kernel) or any(v != 1 for v in g1.strides + g1.dilations) \
                or any(g1.begin + g1.end) or g1.auto_pad not in ("NOTSET", "VALID") or g2.auto_pad not in ("NOTSET", "VALID"):
            return result.fail(f"'{first.name}' is not a plain 1x1 conv (group 1, stride 1, unpadded) or a group is not 1", first)
        if any(g2.begin + g2.end) and np.any(_bias(first, 2, a.shape[0]) != 0):
            return result.fail(f"'{second.name}' pads a biased 1x1 output: zeros there are not the bias", second)
        c, m, o = a.shape[1], a.shape[0], b.shape[0]
        if c * o > c * m + m * o:
            return result.fail(f"merging the {c}->{m}->{o} bottleneck would raise the cost", w1)
        return result

    def rewrite(self, op, x, w1, w2, mid, out, **_):
        first, second = mid.producer(), out.producer()
        a, b = const_array(w1).astype(np.float64), const_array(w2)
        w = np.einsum("om...,mc->oc...", b.astype(np.float64), a.reshape(a.shape[0], a.shape[1]))  # a is 1x1
        inner_bias = _bias(first, 2, a.shape[0]).reshape(1, -1, *([1] * (b.ndim - 2)))
        bias = _bias(second, 2, b.shape[0]) + (b.astype(np.float64) * inner_bias).reshape(b.shape[0], -1).sum(1)
        return op.Conv(x, new_initializer(op, w2, w.astype(b.dtype), "seqmerged"),
                       new_initializer(op, w2, bias.astype(b.dtype), "seqmerged_bias"), **dict(second.attributes))


@register
class MergeBranches(RulePass):
    """Merge parallel Conv branches (and identity/BatchNorm/avg-pool branches) summed over one input, and 1x1->kxk chains, into one Conv."""

    name = "merge-branches"
    kind = PassKind.EXACT
    rules = (MergeSequentialConvs, MergeParallelConvs, AbsorbBranchIntoConv)
