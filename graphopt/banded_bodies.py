"""Banded bodies of the window mixers: the same functions as WindowAttention and HybridAttention
(graphopt/mixer_bodies.py) when S == T and the bias is a padding mask plus, for causal layers,
the causal mask, computed in time and memory linear in T.

Queries go in blocks of c = window; the keys within the window of block b lie in key blocks
b-1, b, b+1 (causal: b-1, b), so a query scores 3c (2c) band keys, plus the `sinks` first keys
where they are outside its band (causal layers only: non-causal layers have no sinks).

The hybrid adds Hedgehog linear attention over every visible key outside the window. Since
    y = (sum_win e^s v + gamma sum_rest a v) / (sum_win e^s + gamma sum_rest a)
(a = phi(q).phi(k)), the softmax needs only the window's row max m for stability, and
sum_rest = sum_visible - sum_band - sum_sinks, where sum_visible is the linear-attention total
(non-causal: phi(K)^T V over every key; causal: its running sum over the same blocks).
"""

from __future__ import annotations

from graphopt.masks import HIDDEN
from graphopt.mixer_bodies import EPS, _feature_map


def window_name(causal: bool) -> str:
    return f"WindowAttentionBanded{'Causal' if causal else ''}"


def hybrid_name(causal: bool) -> str:
    return f"HybridAttentionBanded{'Causal' if causal else ''}"


def window_body(causal: bool) -> str:
    end = """    all_scores = Concat<axis = -1>(masked_band, masked_s)
    p = Softmax<axis = -1>(all_scores)
    p_band = Slice(p, zero_1d, band_len, minus1_1d)
    p_s = Slice(p, band_len, total_len, minus1_1d)
    out_band = MatMul(p_band, vband)
    out_s = MatMul(p_s, vs5)
    out = Add(out_band, out_s)""" if causal else """    p = Softmax<axis = -1>(masked_band)
    out = MatMul(p, vband)"""
    return f"""
{window_name(causal)} <scale, window, sinks> (Q, KT, V, keymask) => (Y) {{
{_prelude(causal)}
{end}
{_epilogue()}
}}"""


def hybrid_body(causal: bool) -> str:
    """Banded softmax inside the window (and sinks), Hedgehog linear attention on the rest."""
    softmax = ("""    all_scores = Concat<axis = -1>(masked_band, masked_s)
    row_max = ReduceMax<keepdims = 1>(all_scores, minus1_1d)""" if causal else
               """    row_max = ReduceMax<keepdims = 1>(masked_band, minus1_1d)""") + """
    m_real = Greater(row_max, threshold)
    m = Where(m_real, row_max, zero_f)
    sb = Sub(masked_band, m)
    e_band = Exp(sb)
    num_w0 = MatMul(e_band, vband)
    den_w0 = ReduceSum<keepdims = 1>(e_band, minus1_1d)
    pkb_t = Transpose<perm = [0, 1, 2, 4, 3]>(pkband)
    a_band0 = MatMul(pqb, pkb_t)
    allowed_f = Cast<to = 1>(allowed)
    a_band = Mul(a_band0, allowed_f)
    num_band = MatMul(a_band, vband)
    den_band = ReduceSum<keepdims = 1>(a_band, minus1_1d)"""
    if causal:
        softmax += """
    ss = Sub(masked_s, m)
    e_s = Exp(ss)
    num_s_w = MatMul(e_s, vs5)
    den_s_w = ReduceSum<keepdims = 1>(e_s, minus1_1d)
    num_w = Add(num_w0, num_s_w)
    den_w = Add(den_w0, den_s_w)
    pks = Slice(pk, zero_1d, sinks_1d, axis2_1d)
    pks_t = Transpose<perm = [0, 1, 3, 2]>(pks)
    pks5 = Unsqueeze(pks_t, axis2_1d)
    a_s0 = MatMul(pqb, pks5)
    sink_f = Cast<to = 1>(sink_ok)
    a_s = Mul(a_s0, sink_f)
    num_s = MatMul(a_s, vs5)
    den_s = ReduceSum<keepdims = 1>(a_s, minus1_1d)
    num_near = Add(num_band, num_s)
    den_near = Add(den_band, den_s)"""
    else:
        softmax += """
    num_w = Identity(num_w0)
    den_w = Identity(den_w0)
    num_near = Identity(num_band)
    den_near = Identity(den_band)"""
    if causal:  # running sums over the query blocks: earlier blocks (exclusive CumSum) + this block (masked)
        total = """    pk_cur = Slice(pkb, one_1d, to_1, axis2_1d)
    v_cur = Slice(vb, one_1d, to_1, axis2_1d)
    pk_cur_t = Transpose<perm = [0, 1, 2, 4, 3]>(pk_cur)
    kv_blocks = MatMul(pk_cur_t, v_cur)
    axis2 = Constant<value = int64 {2}>()
    kv_before = CumSum<exclusive = 1>(kv_blocks, axis2)
    z_blocks = ReduceSum<keepdims = 1>(pk_cur_t, minus1_1d)
    z_before = CumSum<exclusive = 1>(z_blocks, axis2)
    a_self0 = MatMul(pqb, pk_cur_t)
    a_self = Trilu<upper = 0>(a_self0)
    num_in = MatMul(a_self, v_cur)
    num_prev = MatMul(pqb, kv_before)
    num_all = Add(num_prev, num_in)
    den_in = ReduceSum<keepdims = 1>(a_self, minus1_1d)
    den_prev = MatMul(pqb, z_before)
    den_all = Add(den_prev, den_in)"""
    else:
        total = """    pk_t = Transpose<perm = [0, 1, 3, 2]>(pk)
    kv_all = MatMul(pk_t, V)
    z_all = ReduceSum<keepdims = 1>(pk_t, minus1_1d)
    kv5 = Unsqueeze(kv_all, axis2_1d)
    z5 = Unsqueeze(z_all, axis2_1d)
    num_all = MatMul(pqb, kv5)
    den_all = MatMul(pqb, z5)"""
    return f"""
{hybrid_name(causal)} <scale, window, sinks> (Q, KT, V, keymask, W, gamma) => (Y) {{
{_prelude(causal)}
    threshold = Constant<value = float {{{HIDDEN}}}>()
    zero_f = Constant<value = float {{0.0}}>()
    eps = Constant<value = float {{{EPS}}}>()
    root_scale = Sqrt(scale_value)
    {_feature_map("Hedgehog", "Q", "pq")}
    {_feature_map("Hedgehog", "K", "pk0")}
    pk = Mul(pk0, keymask)
    f_dim = Shape<start = -1>(pq)
    shape_f = Concat<axis = 0>(lead, minus1_1d, c, f_dim)
    pqp = Pad(pq, q_pads)
    pqb = Reshape(pqp, shape_f)
    pkp = Pad(pk, kv_pads)
    pkb = Reshape(pkp, shape_f)
{_shifts(causal, "pkb", "pkx")}
    pkband = Concat<axis = 3>({", ".join(f"pkx{j}" for j in range(_blocks(causal)))})
{softmax}
{total}
    num_rest = Sub(num_all, num_near)
    den_rest = Sub(den_all, den_near)
    neg_m = Neg(m)
    em = Exp(neg_m)
    gamma5 = Unsqueeze(gamma, axis2_1d)
    mix = Mul(em, gamma5)
    num_r = Mul(num_rest, mix)
    den_r = Mul(den_rest, mix)
    num = Add(num_w, num_r)
    den0 = Add(den_w, den_r)
    den = Add(den0, eps)
    out = Div(num, den)
{_epilogue()}
}}"""


def _blocks(causal: bool) -> int:
    return 2 if causal else 3


def _shifts(causal: bool, blocked: str, prefix: str) -> str:
    """Key blocks b-1, b(, b+1) of `blocked` [B, H, n + 2, c, .] for every query block b."""
    return "\n".join(f"    {prefix}{j} = Slice({blocked}, from_{j}, to_{j}, axis2_1d)" for j in range(_blocks(causal)))


def _prelude(causal: bool) -> str:
    """Blocks, band scores `masked_band` [B, H, n, c, band] (hidden outside the window or on
    padded keys, `allowed` the mask) and, causal, the sink scores `masked_s` (`sink_ok`)."""
    in_band = ("forward = GreaterOrEqual(diff, zero_i)\n    near0 = LessOrEqual(diff, window_value)\n"
               "    near = And(forward, near0)") if causal else \
        "dist = Abs(diff)\n    near = LessOrEqual(dist, window_value)"
    bounds = "\n".join(f"""    from_{j} = Constant<value = int64[1] {{{j}}}>()
    to_{j} = Add(n_blocks, from_{j})""" for j in range(_blocks(causal)))
    names = range(_blocks(causal))
    text = f"""    scale_value = Constant<value_float: float = @scale>()
    window_value = Constant<value_int: int = @window>()
    hidden = Constant<value = float {{-3.4028234663852886e38}}>()
    half_f = Constant<value = float {{0.5}}>()
    zero_i = Constant<value = int64 {{0}}>()
    one_i = Constant<value = int64 {{1}}>()
    zero_1d = Constant<value = int64[1] {{0}}>()
    one_1d = Constant<value = int64[1] {{1}}>()
    minus1_1d = Constant<value = int64[1] {{-1}}>()
    axis1_1d = Constant<value = int64[1] {{1}}>()
    axis2_1d = Constant<value = int64[1] {{2}}>()
    zero2 = Constant<value = int64[2] {{0, 0}}>()
    K = Transpose<perm = [0, 1, 3, 2]>(KT)
    w_1d = Reshape(window_value, one_1d)
    c = Max(w_1d, one_1d)
    t_len = Shape<start = -2, end = -1>(Q)
    c_minus = Sub(c, one_1d)
    t_up = Add(t_len, c_minus)
    n_blocks = Div(t_up, c)
    padded_len = Mul(n_blocks, c)
    pad_end = Sub(padded_len, t_len)
    pad_kv_end = Add(pad_end, c)
    q_pads = Concat<axis = 0>(zero2, zero_1d, zero_1d, zero2, pad_end, zero_1d)
    kv_pads = Concat<axis = 0>(zero2, c, zero_1d, zero2, pad_kv_end, zero_1d)
    qp = Pad(Q, q_pads)
    kp = Pad(K, kv_pads)
    vp = Pad(V, kv_pads)
    mp = Pad(keymask, kv_pads)
    lead = Shape<end = 2>(Q)
    lead_m = Shape<end = 2>(keymask)
    d_dim = Shape<start = -1>(Q)
    dv_dim = Shape<start = -1>(V)
    shape_q = Concat<axis = 0>(lead, minus1_1d, c, d_dim)
    shape_v = Concat<axis = 0>(lead, minus1_1d, c, dv_dim)
    shape_m = Concat<axis = 0>(lead_m, minus1_1d, c, one_1d)
    qb = Reshape(qp, shape_q)
    kb = Reshape(kp, shape_q)
    vb = Reshape(vp, shape_v)
    mb = Reshape(mp, shape_m)
{bounds}
{_shifts(causal, "kb", "k")}
{_shifts(causal, "vb", "v")}
{_shifts(causal, "mb", "m")}
    kband = Concat<axis = 3>({", ".join(f"k{j}" for j in names)})
    vband = Concat<axis = 3>({", ".join(f"v{j}" for j in names)})
    mband = Concat<axis = 3>({", ".join(f"m{j}" for j in names)})
    kbt = Transpose<perm = [0, 1, 2, 4, 3]>(kband)
    qk = MatMul(qb, kbt)
    scores = Mul(qk, scale_value)
    c0 = Squeeze(c)
    band_keys = Shape<start = 3, end = 4>(kband)
    band0 = Squeeze(band_keys)
    r = Range(zero_i, c0, one_i)
    u = Range(zero_i, band0, one_i)
    rc = Add(r, c0)
    rcol = Unsqueeze(rc, axis1_1d)
    diff = Sub(rcol, u)
    {in_band}
    mt = Transpose<perm = [0, 1, 2, 4, 3]>(mband)
    key_on = Greater(mt, half_f)
    allowed = And(near, key_on)
    masked_band = Where(allowed, scores, hidden)
    band_len = Shape<start = -1>(masked_band)"""
    if causal:
        text += """
    sinks_value = Constant<value_int: int = @sinks>()
    sinks_1d = Reshape(sinks_value, one_1d)
    ks = Slice(K, zero_1d, sinks_1d, axis2_1d)
    vs = Slice(V, zero_1d, sinks_1d, axis2_1d)
    ms = Slice(keymask, zero_1d, sinks_1d, axis2_1d)
    kst = Transpose<perm = [0, 1, 3, 2]>(ks)
    ks5 = Unsqueeze(kst, axis2_1d)
    vs5 = Unsqueeze(vs, axis2_1d)
    qks = MatMul(qb, ks5)
    scores_s = Mul(qks, scale_value)
    n0 = Squeeze(n_blocks)
    block_ids = Range(zero_i, n0, one_i)
    block_start = Mul(block_ids, c0)
    bcol = Unsqueeze(block_start, axis1_1d)
    qpos = Add(bcol, r)
    s_count = Shape<start = 2, end = 3>(ks)
    s0 = Squeeze(s_count)
    key_ids = Range(zero_i, s0, one_i)
    qpos3 = Unsqueeze(qpos, minus1_1d)
    sdiff = Sub(qpos3, key_ids)
    outside = Greater(sdiff, window_value)
    ms4 = Transpose<perm = [0, 1, 3, 2]>(ms)
    ms5 = Unsqueeze(ms4, axis2_1d)
    ms_on = Greater(ms5, half_f)
    sink_ok = And(outside, ms_on)
    masked_s = Where(sink_ok, scores_s, hidden)
    total_len0 = Shape<start = -1>(masked_s)
    total_len = Add(band_len, total_len0)"""
    return text


def _epilogue() -> str:
    """`out` [B, H, n, c, Dv] back to [B, H, T, Dv]."""
    return """    flat = Concat<axis = 0>(lead, minus1_1d, dv_dim)
    yp = Reshape(out, flat)
    Y = Slice(yp, zero_1d, t_len, axis2_1d)"""
