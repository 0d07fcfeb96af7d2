"""Reference bodies of graphopt's token mixers (issue 6), in standard ONNX ops (opset >= 18).

Every mixer replaces a canonical attention op and reads what it read: Q [B, H, S, D],
KT = K^T [B, H, D, T], V [B, H, T, Dv], plus a key mask [B|1, 1, T, 1] (1 = a real key,
0 = padding) derived from the attention bias, and its parameters.

Linear attention, with phi a feature map applied per token:
    Y = phi(Q) (phi(K)^T V) / (phi(Q) sum_t phi(K_t) + eps)
Function names say the feature map, causality and evaluation order:
    LinearAttention{Elu,Relu,Hedgehog,Performer}[Causal][Quadratic]
`Quadratic` evaluates (phi(Q) phi(K)^T) V (masked lower-triangular when causal): cheaper
for short sequences, and the causal reference. The causal linear form is chunked (chunk
CHUNK, or S when shorter): a masked matmul inside each chunk plus the running state
sum_{j<i} phi(K_j)^T V_j across chunks (CumSum), so memory and time are linear in T. Keys
before the last S (a KV cache's past, T > S) enter as the initial state.
`LinearAttention{Map}Recurrent` is the decoding form: the state of all earlier tokens is an
input and an output (fixed size, replacing a KV cache); see recurrent_body.
Feature maps:
    elu        elu(x) + 1
    relu       relu(x)                                   (SLAB's simplified linear attention)
    hedgehog   softmax([x W, -x W]) over features, W per head [H, D, D]  (learnable; x = sqrt(scale) x)
    performer  exp(x w - |x|^2 / 2) / sqrt(m), w [D, m] Gaussian      (FAVOR+; x = sqrt(scale) x)
SLAB's depthwise-conv branch (linear:relu+dwc): Y = LinearAttentionRelu(..) + TokenConv(V),
a per-head, per-channel convolution over the value tokens (kernel CONV_KERNEL, causal layers
see only earlier tokens), fitted on calibration data.
Pooling (PoolFormer over the value tokens): Y = AvgPool_3(V) - V (causal layers average the
current and two previous tokens only).
Sliding window: softmax attention where query i sees key j only when |i' - j| <= window
(i' = i + T - S, the query's position among the keys) or j < sinks; the layer's own bias
(padding, causal) still applies. The reference body computes every score and masks; a
banded kernel is what makes it cheaper, which this body does not provide.
"""

from __future__ import annotations

from graphopt.masks import HIDDEN

CHUNK = 64
CONV_KERNEL = 5  # SLAB's depthwise-conv branch: tokens i-2..i+2 (causal: i-4..i)
EPS = 1e-6
MAPS = ("Elu", "Relu", "Hedgehog", "Performer")


def linear_name(feature_map: str, causal: bool, quadratic: bool, past: bool = False) -> str:
    """`past`: the chunked causal form for T > S (keys before the queries enter as its initial
    state); the plain chunked form needs S == T and skips that slicing."""
    suffix = "Quadratic" if quadratic else "Past" if causal and past else ""
    return f"LinearAttention{feature_map.capitalize()}{'Causal' if causal else ''}{suffix}"


def _feature_map(kind: str, x: str, out: str) -> str:
    """Text computing phi(x) into `out` (x [.., N, D] -> [.., N, F])."""
    if kind == "Elu":
        return f"{out}_e = Elu({x})\n    {out} = Add({out}_e, one)"
    if kind == "Relu":
        return f"{out} = Relu({x})"
    if kind == "Hedgehog":
        return (f"{out}_s = Mul({x}, root_scale)\n    {out}_w = MatMul({out}_s, W)\n    {out}_n = Neg({out}_w)\n"
                f"    {out}_c = Concat<axis = -1>({out}_w, {out}_n)\n    {out} = Softmax<axis = -1>({out}_c)")
    if kind == "Performer":
        return (f"{out}_s = Mul({x}, root_scale)\n    {out}_p = MatMul({out}_s, W)\n    {out}_sq = Mul({out}_s, {out}_s)\n"
                f"    {out}_n = ReduceSum<keepdims = 1>({out}_sq, last)\n    {out}_h = Mul({out}_n, half)\n"
                f"    {out}_a = Sub({out}_p, {out}_h)\n    {out}_x = Exp({out}_a)\n    {out} = Mul({out}_x, inv_sqrt_m)")
    raise ValueError(kind)


def _header(name: str, kind: str) -> str:
    params = ", W" if kind in ("Hedgehog", "Performer") else ""
    return f"{name} <scale> (Q, KT, V, keymask{params}) => (Y)"


_CONSTANTS = """one = Constant<value = float {1.0}>()
    half = Constant<value = float {0.5}>()
    eps = Constant<value = float {%g}>()
    last = Constant<value = int64[1] {-1}>()
    scale_value = Constant<value_float: float = @scale>()
    root_scale = Sqrt(scale_value)""" % EPS


def _performer_norm() -> str:
    return """w_shape = Shape(W)
    m_dim = Slice(w_shape, last, int_max)
    m_float = Cast<to = 1>(m_dim)
    sqrt_m = Sqrt(m_float)
    inv_sqrt_m = Reciprocal(sqrt_m)"""


def _features(header: str, kind: str) -> str:
    """The signature line, then pq = phi(Q) and pk = phi(K) * keymask: what every linear form shares."""
    extra = _performer_norm() if kind == "Performer" else ""
    return f"""
{header} {{
    {_CONSTANTS}
    int_max = Constant<value = int64[1] {{9223372036854775807}}>()
    axis2_1d = Constant<value = int64[1] {{2}}>()
    {extra}
    {_feature_map(kind, "Q", "pq")}
    K = Transpose<perm = [0, 1, 3, 2]>(KT)
    {_feature_map(kind, "K", "pk0")}
    pk = Mul(pk0, keymask)
"""


def linear_body(kind: str, causal: bool, quadratic: bool, past: bool = False) -> str:
    common = _features(_header(linear_name(kind, causal, quadratic, past), kind), kind)
    if not causal and not quadratic:
        core = """    pkt = Transpose<perm = [0, 1, 3, 2]>(pk)
    kv = MatMul(pkt, V)
    num = MatMul(pq, kv)
    ks = ReduceSum<keepdims = 1>(pkt, last)
    den = MatMul(pq, ks)
    dene = Add(den, eps)
    Y = Div(num, dene)
}"""
    elif quadratic:
        mask = """    t_len = Shape<start = -1>(a0)
    s_len = Shape<start = -2, end = -1>(a0)
    offset = Sub(t_len, s_len)
    offset0 = Squeeze(offset)
    a = Trilu<upper = 0>(a0, offset0)""" if causal else "    a = Identity(a0)"
        core = f"""    pkt = Transpose<perm = [0, 1, 3, 2]>(pk)
    a0 = MatMul(pq, pkt)
{mask}
    num = MatMul(a, V)
    den = ReduceSum<keepdims = 1>(a, last)
    dene = Add(den, eps)
    Y = Div(num, dene)
}}"""
    else:
        start = _PREFIX_STATE if past else "    pkc = Identity(pk)\n    vc = Identity(V)\n"
        core = start + _chunked(initial_state=past) + "}"
    return common + core


def recurrent_name(feature_map: str) -> str:
    return f"LinearAttention{feature_map.capitalize()}Recurrent"


def recurrent_body(kind: str) -> str:
    """Causal linear attention over new tokens with the state of every earlier token carried
    outside the graph: state [B, H, F, Dv] = sum_j phi(k_j)^T v_j, normalizer [B, H, F, 1] =
    sum_j phi(k_j)^T; KT and V hold the new tokens only (one when decoding, many when
    prefilling). Outputs the states after the new tokens. It replaces the KV cache, whose size
    grows with the sequence, by a fixed-size state: run token by token it equals the causal
    forms (tested)."""
    params = ", W" if kind in ("Hedgehog", "Performer") else ""
    header = (f"{recurrent_name(kind)} <scale> (Q, KT, V, keymask, state, normalizer{params}) "
              "=> (Y, state_out, normalizer_out)")
    return _features(header, kind) + """    pkc = Identity(pk)
    vc = Identity(V)
    s0 = Identity(state)
    z0 = Identity(normalizer)
""" + _chunked(initial_state=True) + """    kv_total = ReduceSum<keepdims = 0>(kv, axis2_1d)
    state_out = Add(state, kv_total)
    z_total = ReduceSum<keepdims = 0>(z, axis2_1d)
    normalizer_out = Add(normalizer, z_total)
}"""


# The keys before the last S (a KV cache's past, when T > S) summarized as a state: s0, z0
# (a zero key row is prepended so that no past is a sum over one zero row, not over an empty
# axis); pkc, vc the last S keys and values.
_PREFIX_STATE = """    zero1 = Constant<value = int64[1] {0}>()
    t_keys = Shape<start = -2, end = -1>(pk)
    s_queries = Shape<start = -2, end = -1>(pq)
    p_len = Sub(t_keys, s_queries)
    pk_pre = Slice(pk, zero1, p_len, axis2_1d)
    v_pre = Slice(V, zero1, p_len, axis2_1d)
    pkc = Slice(pk, p_len, t_keys, axis2_1d)
    vc = Slice(V, p_len, t_keys, axis2_1d)
    zero_row = Constant<value = int64[8] {0, 0, 1, 0, 0, 0, 0, 0}>()
    pk_pre1 = Pad(pk_pre, zero_row)
    v_pre1 = Pad(v_pre, zero_row)
    pk_pre_t = Transpose<perm = [0, 1, 3, 2]>(pk_pre1)
    s0 = MatMul(pk_pre_t, v_pre1)
    z0 = ReduceSum<keepdims = 1>(pk_pre_t, last)
"""

def _chunked(initial_state: bool) -> str:
    """Causal linear attention over pq/pkc/vc [B, H, S, .] in chunks of c = min(CHUNK, S) (so
    one decoding step is one chunk of one token): inside a chunk a masked matmul, across chunks
    the running state (s0 +) sum_{earlier chunks} phi(K)^T V (CumSum), likewise the normalizer
    (z0 +); s0, z0 the `initial_state`."""
    if initial_state:
        state = "    s0u = Unsqueeze(s0, axis2_1d)\n    state_run = Add(state_ex, s0u)\n"
        normalizer = "    z0u = Unsqueeze(z0, axis2_1d)\n    zs = Add(zs_ex, z0u)\n"
    else:
        state, normalizer = "    state_run = Identity(state_ex)\n", "    zs = Identity(zs_ex)\n"
    return f"""    chunk_max = Constant<value = int64[1] {{{CHUNK}}}>()
    zero1c = Constant<value = int64[1] {{0}}>()
    zero2 = Constant<value = int64[2] {{0, 0}}>()
    minus1 = Constant<value = int64[1] {{-1}}>()
    axis2 = Constant<value = int64 {{2}}>()
    s_len = Shape<start = -2, end = -1>(pkc)
    chunk = Min(chunk_max, s_len)
    rem = Mod(s_len, chunk)
    short = Sub(chunk, rem)
    pad = Mod(short, chunk)
    pads8 = Concat<axis = 0>(zero2, zero1c, zero1c, zero2, pad, zero1c)
    qp = Pad(pq, pads8)
    kp = Pad(pkc, pads8)
    vp = Pad(vc, pads8)
    lead = Shape<end = 2>(pq)
    f_dim = Shape<start = -1>(pq)
    dv_dim = Shape<start = -1>(vc)
    shape_f = Concat<axis = 0>(lead, minus1, chunk, f_dim)
    shape_v = Concat<axis = 0>(lead, minus1, chunk, dv_dim)
    q5 = Reshape(qp, shape_f)
    k5 = Reshape(kp, shape_f)
    v5 = Reshape(vp, shape_v)
    k5t = Transpose<perm = [0, 1, 2, 4, 3]>(k5)
    kv = MatMul(k5t, v5)
    state_ex = CumSum<exclusive = 1>(kv, axis2)
{state}    inter = MatMul(q5, state_run)
    a0 = MatMul(q5, k5t)
    a = Trilu<upper = 0>(a0)
    intra = MatMul(a, v5)
    z = ReduceSum<keepdims = 1>(k5t, last)
    zs_ex = CumSum<exclusive = 1>(z, axis2)
{normalizer}    den_inter = MatMul(q5, zs)
    den_intra = ReduceSum<keepdims = 1>(a, last)
    num = Add(inter, intra)
    den0 = Add(den_inter, den_intra)
    den = Add(den0, eps)
    y5 = Div(num, den)
    flat = Concat<axis = 0>(lead, minus1, dv_dim)
    yp = Reshape(y5, flat)
    Y = Slice(yp, zero1c, s_len, axis2_1d)
"""


def token_conv_body(causal: bool) -> str:
    """SLAB's depthwise-conv branch over the value tokens, per head and channel:
    Y_i = sum_j W[h, j, c] * V_{i + j - a} (a = K // 2, causal: a = K - 1), padded keys zeroed,
    zero padding at the ends; the last S rows (the queries). W [H, K, Dv]."""
    before, after = (CONV_KERNEL - 1, 0) if causal else (CONV_KERNEL // 2, CONV_KERNEL // 2)
    taps = []
    for j in range(CONV_KERNEL):
        taps.append(f"""    start_{j} = Constant<value = int64[1] {{{j}}}>()
    end_{j} = Add(t_len, start_{j})
    tap_{j} = Slice(padded, start_{j}, end_{j}, axis2)
    index_{j} = Constant<value = int64 {{{j}}}>()
    w_{j} = Gather<axis = 1>(W, index_{j})
    wb_{j} = Unsqueeze(w_{j}, axes02)
    term_{j} = Mul(tap_{j}, wb_{j})""")
    terms = ", ".join(f"term_{j}" for j in range(CONV_KERNEL))
    taps_text = "\n".join(taps)
    return f"""
{"CausalTokenConv" if causal else "TokenConv"} (Q, V, keymask, W) => (Y) {{
    axis2 = Constant<value = int64[1] {{2}}>()
    axes02 = Constant<value = int64[2] {{0, 2}}>()
    int_max = Constant<value = int64[1] {{9223372036854775807}}>()
    pads = Constant<value = int64[8] {{0, 0, {before}, 0, 0, 0, {after}, 0}}>()
    masked = Mul(V, keymask)
    padded = Pad(masked, pads)
    t_len = Shape<start = -2, end = -1>(V)
    s_len = Shape<start = -2, end = -1>(Q)
{taps_text}
    conv = Sum({terms})
    first = Sub(t_len, s_len)
    Y = Slice(conv, first, int_max, axis2)
}}"""


def pool_body(causal: bool = False) -> str:
    """Y = AvgPool(V) - V over the token axis: tokens i-1..i+1, or i-2..i for causal layers;
    the last S rows (the queries: with a KV cache, V also holds the past tokens)."""
    name, pads = ("CausalPoolMixer", "[2, 0, 0, 0]") if causal else ("PoolMixer", "[1, 0, 1, 0]")
    return f"""
{name} (Q, V) => (Y) {{
    pooled = AveragePool<kernel_shape = [3, 1], pads = {pads}, strides = [1, 1], count_include_pad = 0>(V)
    mixed = Sub(pooled, V)
    t_len = Shape<start = -2, end = -1>(V)
    s_len = Shape<start = -2, end = -1>(Q)
    first = Sub(t_len, s_len)
    int_max = Constant<value = int64[1] {{9223372036854775807}}>()
    axis2 = Constant<value = int64[1] {{2}}>()
    Y = Slice(mixed, first, int_max, axis2)
}}"""


_BAND = """window_value = Constant<value_int: int = @window>()
    sinks_value = Constant<value_int: int = @sinks>()
    zero_i = Constant<value = int64 {0}>()
    one_i = Constant<value = int64 {1}>()
    axis0 = Constant<value = int64[1] {0}>()
    axis1 = Constant<value = int64[1] {1}>()
    s_len = Shape<start = -2, end = -1>(Q)
    t_len = Shape<start = -1>(KT)
    offset = Sub(t_len, s_len)
    s0 = Squeeze(s_len)
    t0 = Squeeze(t_len)
    rows = Range(zero_i, s0, one_i)
    offset0 = Squeeze(offset)
    qpos = Add(rows, offset0)
    kpos = Range(zero_i, t0, one_i)
    qcol = Unsqueeze(qpos, axis1)
    krow = Unsqueeze(kpos, axis0)
    diff = Sub(qcol, krow)
    dist = Abs(diff)
    near = LessOrEqual(dist, window_value)
    sink = Less(krow, sinks_value)
    allowed = Or(near, sink)"""
# `allowed` [S, T]: key j is within `window` of query i (at position i + T - S among the keys) or j < sinks.


def window_body() -> str:
    return f"""
WindowAttention <scale, window, sinks> (Q, KT, V, bias) => (Y) {{
    scale_value = Constant<value_float: float = @scale>()
    open_value = Constant<value = float {{0.0}}>()
    hidden = Constant<value = float {{-3.4028234663852886e38}}>()
    {_BAND}
    qk = MatMul(Q, KT)
    scores = Mul(qk, scale_value)
    band = Where(allowed, open_value, hidden)
    banded = Add(scores, band)
    biased = Add(banded, bias)
    p = Softmax<axis = -1>(biased)
    Y = MatMul(p, V)
}}"""


def hybrid_body() -> str:
    """Softmax over a sliding window (plus sinks), Hedgehog linear attention over every other
    visible key, mixed by a learned per-head factor gamma [1, H, 1, 1]:
        y = (sum_win e^(s - m) v + gamma e^-m sum_rest a v) / (sum_win e^(s - m) + gamma e^-m sum_rest a)
    with s = scale q.k + bias, m the row max, a = phi(q).phi(k). Reference body: every score is
    computed (a banded kernel is what would make it cheaper)."""
    return f"""
HybridAttention <scale, window, sinks> (Q, KT, V, bias, W, gamma) => (Y) {{
    {_CONSTANTS}
    threshold = Constant<value = float {{{HIDDEN}}}>()
    {_BAND}
    qk = MatMul(Q, KT)
    scores0 = Mul(qk, scale_value)
    scores = Add(scores0, bias)
    in_window = Cast<to = 1>(allowed)
    visible = Greater(bias, threshold)
    visible_f = Cast<to = 1>(visible)
    m = ReduceMax<keepdims = 1>(scores, last)
    shifted = Sub(scores, m)
    e = Exp(shifted)
    ew = Mul(e, in_window)
    {_feature_map("Hedgehog", "Q", "pq")}
    K = Transpose<perm = [0, 1, 3, 2]>(KT)
    {_feature_map("Hedgehog", "K", "pk")}
    pkt = Transpose<perm = [0, 1, 3, 2]>(pk)
    a0 = MatMul(pq, pkt)
    out_window = Sub(one, in_window)
    a1 = Mul(a0, out_window)
    a = Mul(a1, visible_f)
    neg_m = Neg(m)
    em = Exp(neg_m)
    mix = Mul(em, gamma)
    num_w = MatMul(ew, V)
    num_a0 = MatMul(a, V)
    num_a = Mul(num_a0, mix)
    num = Add(num_w, num_a)
    den_w = ReduceSum<keepdims = 1>(ew, last)
    den_a0 = ReduceSum<keepdims = 1>(a, last)
    den_a = Mul(den_a0, mix)
    den0 = Add(den_w, den_a)
    den = Add(den0, eps)
    Y = Div(num, den)
}}"""

