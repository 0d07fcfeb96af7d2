"""Lowerings of graphopt's canonical ops to what onnxruntime runs fastest on one provider.

Each is a separate pass so the measured selection (graphopt/backends/ort.py) can time
them against each other on the user's shapes and keep the winner:

    lower-attention-mha    graphopt attention -> com.microsoft MultiHeadAttention
    lower-attention-packed graphopt attention over a packed Q/K/V projection ->
                           com.microsoft Attention (projection and attention in one kernel)
    lower-attention-onnx   graphopt attention -> ONNX Attention (opset 23; the model's
                           opset is raised when no op it uses changed meaning on the way)
    lower-skip-norm        Add + LayerNormalization / RMSNormalization ->
                           com.microsoft SkipLayerNormalization / SkipSimplifiedLayerNormalization

Leaving the canonical op as it is is the third attention candidate: onnxruntime inlines
its reference body (the decomposed MatMul-Softmax-MatMul form).
"""

from __future__ import annotations

import numpy as np

from graphopt import functions, ops
from graphopt.library.attention import is_canonical
from graphopt.ir import MatchResult, common_passes, ir, pattern
from graphopt.passes._checks import scalar
from graphopt.passes._edits import replace_value
from graphopt.passes.cleanup import ReadShapesFromInputs
from graphopt.passes._weights import add_initializer, const_array
from graphopt.registry import register
from graphopt.rewrite import RULE_TAG, Pass, PassKind, Rule, RulePass

ONNX_ATTENTION_OPSET = 23
# Standard ops whose meaning (not only their type lists) changed between opset 17 and 23:
# raising a model that uses them to opset 23 would change what it computes.
_CHANGED_BY_23 = frozenset({"GroupNormalization", "DFT", "GridSample", "DequantizeLinear", "QuantizeLinear"})


class _LowerAttention(Pass):
    """Shared walk: every canonical attention op the form accepts is replaced in place."""

    kind = PassKind.LOWERING
    requires_shapes = True
    RULE: str

    def run(self, model: ir.Model) -> dict[str, int]:
        if self.model_blocker(model):
            return {self.RULE: 0}
        done = 0
        for node in [n for n in model.graph if is_canonical(n)]:
            if self.node_blocker(node) is None:
                new, result = self.lower(model.graph, node)
                for n in new:
                    n.metadata_props[RULE_TAG] = self.RULE
                model.graph.insert_before(node, new)
                replace_value(model.graph, node.outputs[0], result)
                model.graph.remove(node, safe=True)
                done += 1
        if done:
            self.prepare(model)
            ReadShapesFromInputs().run(model)  # shape reads of the replaced activations would keep them alive
            common_passes.RemoveUnusedNodesPass()(model)
            common_passes.RemoveUnusedFunctionsPass()(model)
        return {self.RULE: done}

    def explain(self, model: ir.Model) -> list[str]:
        if reason := self.model_blocker(model):
            return [f"{self.RULE}: {reason}"]
        return [f"{self.RULE}: {n.op_type} '{n.name}': {r}" for n in model.graph
                if is_canonical(n) and (r := self.node_blocker(n))]

    def model_blocker(self, model: ir.Model) -> str | None:
        return None

    def node_blocker(self, node: ir.Node) -> str | None:
        return None

    def prepare(self, model: ir.Model) -> None:
        """Opset imports the lowered ops need."""

    def lower(self, graph: ir.Graph, node: ir.Node) -> tuple[list[ir.Node], ir.Value]:
        raise NotImplementedError


class _ContribLowering(_LowerAttention):
    """Lowerings to com.microsoft ops, which return [B, S, H*D] and take a bias of rank <= 4."""

    def prepare(self, model: ir.Model) -> None:
        model.opset_imports.setdefault(ops.ORT_CONTRIB_DOMAIN, 1)

    @staticmethod
    def bias_blocker(node: ir.Node) -> str | None:
        bias = node.inputs[3] if len(node.inputs) > 3 else None
        if bias is not None and (bias.shape is None or len(bias.shape) > 4):
            return f"bias '{bias.name}' has unknown rank or rank above 4"
        return None

    @staticmethod
    def heads_first(graph: ir.Graph, new: list[ir.Node], out: ir.Value, node: ir.Node) -> ir.Value:
        """[B, S, H*D] -> [B, H, S, D], the canonical op's output layout."""
        heads, size = node.attributes.get_int("q_num_heads"), node.attributes.get_int("head_size")
        split = add_initializer(graph, None, np.array([0, 0, heads, size], dtype=np.int64), "heads_split")
        return _node(new, "Transpose", [_node(new, "Reshape", [out, split])], perm=[0, 2, 1, 3])


@register
class LowerAttentionMHA(_ContribLowering):
    """Canonical attention -> onnxruntime's com.microsoft MultiHeadAttention.

    Math: MHA takes Q as [B, S, H*D] and K, V as [B, H, T, D] (BNSH), an additive bias
    broadcastable over batch and heads, and returns [B, S, H*D]:
        Y = Transpose(Reshape(MHA(Reshape(Transpose(Q)), K, V, bias), [B, S, H, D]))
    K = Transpose(KT, [0, 1, 3, 2]), composed with the transpose that made KT.
    Preconditions:
        1. Q is rank 4 with known head count and head size (q_num_heads, head_size).
        2. The bias (if any) has rank at most 4.
    """

    name = "lower-attention-mha"
    RULE = "LowerAttentionMHA"

    def node_blocker(self, node: ir.Node) -> str | None:
        q = node.inputs[0]
        if q.shape is None or len(q.shape) != 4:
            return f"Q '{q.name}' is not known to be rank 4 ([batch, heads, seq, head size])"
        if not node.attributes.get_int("q_num_heads", 0) or not node.attributes.get_int("head_size", 0):
            return "the head count or head size is unknown"
        return self.bias_blocker(node)

    def lower(self, graph, node):
        q, kt, v = node.inputs[:3]
        new: list[ir.Node] = []
        q_bsnh = _node(new, "Transpose", [q], perm=[0, 2, 1, 3])
        flat = add_initializer(graph, None, np.array([0, 0, -1], dtype=np.int64), "mha_flat")
        q3 = _node(new, "Reshape", [q_bsnh, flat])
        k = _untransposed(new, kt)
        inputs = [q3, k, v]
        if len(node.inputs) > 3:
            inputs += [None, None, _bias_4d(graph, new, node.inputs[3], q, kt)]
        out = _node(new, "MultiHeadAttention", inputs, domain=ops.ORT_CONTRIB_DOMAIN,
                    num_heads=node.attributes.get_int("q_num_heads"), scale=node.attributes.get_float("scale"))
        return new, self.heads_first(graph, new, out, node)


@register
class LowerAttentionPacked(_ContribLowering):
    """Canonical attention over one packed Q/K/V projection -> com.microsoft Attention.

    Math: with [Q | K | V] = x W + b split in three along the last axis and each reshaped
    to [B, S, H, D] and transposed to heads-first (K to [B, H, D, S]),
        Y = Transpose(Reshape(Attention(x, W, b, bias), [B, S, H, D]))
    onnxruntime's Attention does the projection, the split and the attention in one kernel.
    Preconditions:
        1. Q, KT and V are outputs 0, 1, 2 of one Split of Add(MatMul(x, W), b) over the
           last axis, W and b constant, each Reshape'd to [.., H, D] and transposed
           heads-first (no RoPE or other op in between).
        2. The head count is known and the three parts are equal in size.
        3. The bias (if any) has rank at most 4.
    """

    name = "lower-attention-packed"
    RULE = "LowerAttentionPacked"

    def node_blocker(self, node: ir.Node) -> str | None:
        found = _packed(node)
        return found if isinstance(found, str) else self.bias_blocker(node)

    def lower(self, graph, node):
        x, w, b = _packed(node)
        new: list[ir.Node] = []
        inputs = [x, w, b]
        if len(node.inputs) > 3:
            inputs += [None, None, _bias_4d(graph, new, node.inputs[3], node.inputs[0], node.inputs[1])]
        out = _node(new, "Attention", inputs, domain=ops.ORT_CONTRIB_DOMAIN,
                    num_heads=node.attributes.get_int("q_num_heads"), scale=node.attributes.get_float("scale"))
        return new, self.heads_first(graph, new, out, node)


def _packed(node: ir.Node):
    """(x, W, b) of the packed projection feeding the canonical op `node`, or why not."""
    heads, size = node.attributes.get_int("q_num_heads", 0), node.attributes.get_int("head_size", 0)
    if not heads or not size:
        return "the head count or head size is unknown"
    parts = []
    for value, perm in zip(node.inputs[:3], ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3])):
        t = value.producer()
        r = t.inputs[0].producer() if t is not None and t.op_type == "Transpose" else None
        if t is None or list(t.attributes.get_ints("perm", [])) != perm or r is None or r.op_type != "Reshape":
            return f"'{value.name}' is not a head split (Reshape then Transpose {perm}) of a projection"
        parts.append(r.inputs[0])
    split = parts[0].producer()
    if split is None or split.op_type != "Split" or [p.producer() for p in parts] != [split] * 3 or \
            [split.outputs.index(p) for p in parts] != [0, 1, 2] or len(split.outputs) != 3:
        return "Q, K and V are not the three outputs of one Split"
    add = split.inputs[0].producer()
    if add is None or add.op_type != "Add":
        return f"the Split '{split.name}' does not read a biased projection"
    matmul_index = 0 if add.inputs[0].producer() is not None and add.inputs[0].producer().op_type == "MatMul" else 1
    matmul, b = add.inputs[matmul_index].producer(), add.inputs[1 - matmul_index]
    if matmul is None or matmul.op_type != "MatMul":
        return f"the Split '{split.name}' does not read Add(MatMul(x, W), b)"
    x, w = matmul.inputs
    w_array, b_array = const_array(w), const_array(b)
    if w_array is None or b_array is None or w_array.ndim != 2 or b_array.shape != (w_array.shape[1],) or \
            w_array.shape[1] != 3 * heads * size:
        return "the packed projection's weight or bias is not constant [hidden, 3 x heads x head size]"
    return x, w, b


@register
class LowerAttentionONNX(_LowerAttention):
    """Canonical attention -> the standard ONNX Attention op (opset 23).

    Math: Attention(Q, K, V, attn_mask=bias, scale=c) = softmax(c Q K^T + bias) V with
    K = Transpose(KT, [0, 1, 3, 2]); for grouped-query layers K and V are taken from before
    the repeat_kv Expand (Attention repeats the key/value heads itself).
    Preconditions:
        1. onnxruntime loads opset 23, and the model uses no op whose meaning or signature
           changed between its opset and 23 (GroupNormalization, DFT, GridSample,
           (De)QuantizeLinear; Reduce ops with an `axes` attribute, an input since opset 18).
        2. Q is rank 4.
    """

    name = "lower-attention-onnx"
    RULE = "LowerAttentionONNX"

    def model_blocker(self, model: ir.Model) -> str | None:
        from graphopt import sessions as ort

        if ort.max_opset() < ONNX_ATTENTION_OPSET:
            return f"the installed onnxruntime loads opset {ort.max_opset()}, ONNX Attention needs {ONNX_ATTENTION_OPSET}"
        if model.opset_imports.get("", 0) < ONNX_ATTENTION_OPSET:
            changed = sorted({n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == "" and (
                n.op_type in _CHANGED_BY_23 or (n.op_type.startswith("Reduce") and "axes" in n.attributes))})
            if changed:
                return f"raising the model to opset {ONNX_ATTENTION_OPSET} would change {', '.join(changed)} (convert the model first)"
        if not any(is_canonical(n) for n in model.graph):
            return "no canonical attention op (run fuse-attention first)"
        return None

    def node_blocker(self, node: ir.Node) -> str | None:
        q = node.inputs[0]
        if q.shape is None or len(q.shape) != 4:
            return f"Q '{q.name}' is not known to be rank 4"
        return None

    def prepare(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 0) < ONNX_ATTENTION_OPSET:
            model.opset_imports[""] = ONNX_ATTENTION_OPSET
            for key in [k for k in model.functions if k[0] == functions.DOMAIN]:
                del model.functions[key]  # their bodies are written for the old opset: rebuilt for the new one
            functions.ensure(model)

    def lower(self, graph, node):
        q, kt, v = node.inputs[:3]
        new: list[ir.Node] = []
        kv_heads = node.attributes.get_int("kv_num_heads", 0)
        k = _untransposed(new, kt)
        k_kv, v_kv = _before_repeat(k, kv_heads), _before_repeat(v, kv_heads)
        if k_kv is not None and v_kv is not None:
            k, v = k_kv, v_kv
        inputs = [q, k, v] + ([node.inputs[3]] if len(node.inputs) > 3 else [])
        y = _node(new, "Attention", inputs, scale=node.attributes.get_float("scale"))
        return new, y


def _node(new: list[ir.Node], op: str, inputs, domain: str = "", **attrs) -> ir.Value:
    node = ir.node(op, inputs, attributes=attrs, domain=domain)
    new.append(node)
    return node.outputs[0]


def _untransposed(new: list[ir.Node], kt: ir.Value) -> ir.Value:
    """K = Transpose(KT, [0, 1, 3, 2]), folded into the Transpose that produced KT when there is one."""
    producer = kt.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.domain == "":
        perm = list(producer.attributes.get_ints("perm", []))
        if len(perm) == 4:
            composed = [perm[0], perm[1], perm[3], perm[2]]
            src = producer.inputs[0]
            return src if composed == [0, 1, 2, 3] else _node(new, "Transpose", [src], perm=composed)
    return _node(new, "Transpose", [kt], perm=[0, 1, 3, 2])


def _before_repeat(value: ir.Value, kv_heads: int) -> ir.Value | None:
    """x for value = Reshape(Expand(Unsqueeze(x, axis 2))) with x [B, kv_heads, T, D] (repeat_kv)."""
    reshape = value.producer()
    expand = reshape.inputs[0].producer() if reshape is not None and reshape.op_type == "Reshape" else None
    unsqueeze = expand.inputs[0].producer() if expand is not None and expand.op_type == "Expand" else None
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None
    source = unsqueeze.inputs[0]
    if source.shape is None or len(source.shape) != 4 or source.shape[1] != kv_heads:
        return None
    return source


def _bias_4d(graph: ir.Graph, new: list[ir.Node], bias: ir.Value, q: ir.Value, kt: ir.Value) -> ir.Value:
    """The bias expanded to [B|1, H|1, S, T] (MultiHeadAttention does not broadcast S and T)."""
    ones = add_initializer(graph, None, np.array([1, 1], dtype=np.int64), "bias_lead")
    s = _node(new, "Shape", [q], start=2, end=3)
    t = _node(new, "Shape", [kt], start=3, end=4)
    target = _node(new, "Concat", [ones, s, t], axis=0)
    return _node(new, "Expand", [bias, target])


class _AddIntoNorm(Rule):
    """The pattern two lowerings share: norm(Add(a, b)), LayerNormalization or RMSNormalization,
    standard or graphopt's (epsilon as a constant input)."""

    variants = ({"rms": False, "domain": ""}, {"rms": True, "domain": ""},
                {"rms": False, "domain": functions.DOMAIN}, {"rms": True, "domain": functions.DOMAIN})

    def pattern(self, op, a, b, scale):
        s = op.Add(a, b)
        args = [s, scale] + ([] if self.rms else [pattern.Var("bias")]) + ([pattern.Var("eps")] if self.domain else [])
        norm = getattr(op, "RMSNormalization" if self.rms else "LayerNormalization")(
            *args, _domain=self.domain, _allow_other_attributes=True, _outputs=["normed"])
        return s, norm


class SkipNorm(_AddIntoNorm):
    """norm(a + b), the sum also kept -> SkipLayerNormalization / SkipSimplifiedLayerNormalization.

    Math: SkipLayerNormalization(a, b, gamma, beta) = (LayerNorm(a + b), -, -, a + b); the
    simplified form is the same for RMSNorm (no beta). Matches the standard ops and
    graphopt's norm functions (epsilon as a constant input).
    Preconditions:
        1. The norm is over the last axis with a 1-D scale (and bias), epsilon a constant.
        2. a and b have the same rank-3 shape (onnxruntime's kernel reads [B, S, H]).
    """


    def check(self, context, a, b, scale, normed, **kw):
        result = MatchResult()
        norm = normed.producer()
        rank = len(a.shape) if a.shape is not None else 0
        if norm.attributes.get_int("axis", -1) not in (-1, rank - 1) or scale.shape is None or len(scale.shape) != 1:
            return result.fail("the norm is not over the last axis with a 1-D scale", norm)
        if self.domain and scalar(kw.get("eps")) is None:
            return result.fail("epsilon is not a constant", norm)
        if a.shape is None or b.shape is None or rank != 3 or a.shape != b.shape:
            return result.fail(f"'{a.name}' and '{b.name}' are not known to share one rank-3 shape", a)
        return result

    def rewrite(self, op, a, b, scale, normed, bias=None, eps=None, **_):
        epsilon = scalar(eps) if eps is not None else normed.producer().attributes.get_float("epsilon", 1e-5)
        if self.rms:
            out, _, _, total = op.SkipSimplifiedLayerNormalization(a, b, scale, epsilon=epsilon, _domain=ops.ORT_CONTRIB_DOMAIN, _outputs=4)
        else:
            out, _, _, total = op.SkipLayerNormalization(a, b, scale, bias, epsilon=epsilon, _domain=ops.ORT_CONTRIB_DOMAIN, _outputs=4)
        return total, out


@register
class LowerSkipNorm(RulePass):
    """Residual Add + LayerNormalization/RMSNormalization -> onnxruntime's Skip*Normalization."""

    name = "lower-skip-norm"
    kind = PassKind.LOWERING
    requires_shapes = True
    rules = (SkipNorm,)


class NormInputAsSum(_AddIntoNorm):
    """norm(Add(a, b)) -> norm(Sum(a, b)): the same sum, written so that onnxruntime's
    Skip*LayerNormFusion does not match it.

    Math: Sum(a, b) = Add(a, b) (Sum is variadic Add, with the same broadcasting). Why: on some
    CPUs onnxruntime's fused SkipLayerNormalization kernel is several times slower than the
    plain Add + LayerNormalization it replaces, and a session fuses it unless told not to; the
    Sum form stays plain in a default session, with no session option to carry.
    Preconditions:
        1. The Add feeds a LayerNormalization or RMSNormalization (standard or graphopt's).
    """


    def rewrite(self, op, a, b, scale, normed, bias=None, eps=None, **_):
        norm = normed.producer()
        total = op.Sum(a, b)
        inputs = [total, *norm.inputs[1:]]
        attrs = {k: v.value for k, v in norm.attributes.items()}
        return total, getattr(op, norm.op_type)(*inputs, _domain=norm.domain, **attrs)


@register
class LowerNormInputSum(RulePass):
    """Residual Add feeding a norm -> Sum: plain Add + norm kernels in a default onnxruntime session."""

    name = "lower-norm-input-sum"
    kind = PassKind.LOWERING
    rules = (NormInputAsSum,)
