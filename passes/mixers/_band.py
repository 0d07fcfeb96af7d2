"""What the window and hybrid mixers share: the band of keys each query sees, in two forms.

`full_band`: the [S, T] mask of keys within `window` of query i (at position i + T - S among
the keys) or among the first `sinks`, for bodies that score every key.
`blocks`: the same band computed in linear time when S == T and the bias only hides keys:
queries go in blocks of c = max(ceil(window / r), min_block), r = PER_WINDOW; the keys within the window of
block b lie in key blocks b-r .. b+r (causal: b-r .. b), so a causal query scores (r + 1) c,
about 1.5 windows of keys (2 with blocks of the window's size), a non-causal one (2r + 1) c,
about 2.5 (3); plus, causal layers, the `sinks` first keys where they are outside its band
(non-causal layers have no sinks). Keys outside the window or padded are hidden by adding
MASKED (a [B|1, 1, n, c, band] bias the heads share): an Add, where a Where over the
[B, H, n, c, band] scores took 3.8 ms a layer at 2048 tokens, more than the scores' MatMul.
"""

from __future__ import annotations

from graphopt.ir import ir

LOWEST = -3.4028234663852886e38  # float32's lowest: an additive entry that hides a key
MASKED = -1e37  # hides a key in the band's additive mask: two of them add up finite, and a row of them stays finite
PER_WINDOW = 2  # query blocks per window: blocks of ceil(window / 2)


def full_band(op, c, q, kt):
    """`allowed` [S, T]: |i + T - S - j| <= window, or j < sinks."""
    zero, one = c.i64(0), c.i64(1)
    s_len, t_len = op.Shape(q, start=-2, end=-1), op.Shape(kt, start=-1)
    qpos = op.Add(op.Range(zero, op.Squeeze(s_len), one), op.Squeeze(op.Sub(t_len, s_len)))
    krow = op.Unsqueeze(op.Range(zero, op.Squeeze(t_len), one), c.i64([0]))
    near = op.LessOrEqual(op.Abs(op.Sub(op.Unsqueeze(qpos, c.i64([1])), krow)), c.attr("window", ir.AttributeType.INT))
    return op.Or(near, op.Less(krow, c.attr("sinks", ir.AttributeType.INT)))


def count(causal: bool) -> int:
    """Key blocks a query block sees: b-r .. b (.. b+r unless causal)."""
    return PER_WINDOW + 1 if causal else 2 * PER_WINDOW + 1


class Blocks:
    """The blocked band of one call (built by `blocks`). Shapes: `qb` blocked queries
    [B, H, n, c, D]; `vb` blocked values; `vband` band values [B, H, n, band, Dv];
    `masked_band` the band scores, hidden outside the window or on padded keys; causal layers
    also `masked_s` (sink scores, `sink_ok` their mask), `vs5` (sink values) and `sinks_1d`."""

    def __init__(self, op, c, causal: bool) -> None:
        self.op, self.c, self.causal = op, c, causal

    def blocked(self, x, pads, last_dim):
        """x [B, H, T, .] padded with `pads` and cut into blocks [B, H, n, c, .]."""
        op, c = self.op, self.c
        return op.Reshape(op.Pad(x, pads), op.Concat(self.lead, c.i64([-1]), self.block, last_dim, axis=0))

    def band(self, blocked):
        """The key blocks b-1, b(, b+1) of `blocked` side by side for every query block b."""
        op, c = self.op, self.c
        return op.Concat(*[op.Slice(blocked, lo, hi, c.i64([2])) for lo, hi in self.bounds], axis=3)

    def current(self, blocked):
        """The blocks of `blocked` (padded like the keys) that hold the queries' own positions."""
        op, c = self.op, self.c
        start = c.i64([PER_WINDOW])
        return op.Slice(blocked, start, op.Add(self.n_blocks, start), c.i64([2]))

    def unblock(self, out):
        """`out` [B, H, n, c, Dv] back to [B, H, T, Dv]."""
        op, c = self.op, self.c
        flat = op.Reshape(out, op.Concat(self.lead, c.i64([-1]), self.dv_dim, axis=0))
        return op.Slice(flat, c.i64([0]), self.t_len, c.i64([2]))


def blocks(op, c, q, kt, v, keymask, causal: bool, min_block: int = 1) -> Blocks:
    """Blocks of max(ceil(window / PER_WINDOW), min_block) queries, the band scores, and
    (causal) the sink scores. Blocks larger than the window needs stay exact: the band then
    holds more keys than the window, and the mask hides them."""
    scale, window = c.attr("scale"), c.attr("window", ir.AttributeType.INT)
    hidden, half, masked, zero_f = c.f32(LOWEST), c.f32(0.5), c.f32(MASKED), c.f32(0.0)
    zero, one, zero_1d, one_1d, axis2 = c.i64(0), c.i64(1), c.i64([0]), c.i64([1]), c.i64([2])
    per = c.i64([PER_WINDOW])
    k = op.Transpose(kt, perm=[0, 1, 3, 2])
    block = op.Max(op.Div(op.Add(op.Reshape(window, one_1d), c.i64([PER_WINDOW - 1])), per), c.i64([min_block]))
    t_len = op.Shape(q, start=-2, end=-1)
    # a layer without a bias passes a [1, 1, 1, 1] key mask: broadcast it over the keys first
    keymask = op.Expand(keymask, op.Concat(op.Shape(keymask, end=2), t_len, one_1d, axis=0))
    n_blocks = op.Div(op.Add(t_len, op.Sub(block, one_1d)), block)
    pad_end = op.Sub(op.Mul(n_blocks, block), t_len)
    zero2 = c.i64([0, 0])
    front = op.Mul(block, per)  # r blocks before the first (and, non-causal, after the last)
    q_pads = op.Concat(zero2, zero_1d, zero_1d, zero2, pad_end, zero_1d, axis=0)
    kv_pads = op.Concat(zero2, front, zero_1d, zero2, pad_end if causal else op.Add(pad_end, front), zero_1d, axis=0)
    b = Blocks(op, c, causal)
    b.scale, b.K, b.block, b.n_blocks, b.t_len, b.q_pads, b.kv_pads = scale, k, block, n_blocks, t_len, q_pads, kv_pads
    b.bounds = [(start, op.Add(n_blocks, start)) for start in (c.i64([j]) for j in range(count(causal)))]
    b.lead, b.dv_dim = op.Shape(q, end=2), op.Shape(v, start=-1)
    d_dim = op.Shape(q, start=-1)
    b.qb = qb = b.blocked(q, q_pads, d_dim)
    b.vb = b.blocked(v, kv_pads, b.dv_dim)
    mb = op.Reshape(op.Pad(keymask, kv_pads), op.Concat(op.Shape(keymask, end=2), c.i64([-1]), block, one_1d, axis=0))
    kband = b.band(b.blocked(k, kv_pads, d_dim))
    b.vband, mband = b.band(b.vb), b.band(mb)
    scores = op.Mul(op.MatMul(qb, op.Transpose(kband, perm=[0, 1, 2, 4, 3])), scale)
    c0 = op.Squeeze(block)
    r = op.Range(zero, c0, one)
    # query u of block b against band key j (key position (b - r) c + j): distance u + r c - j
    diff = op.Sub(op.Unsqueeze(op.Add(r, op.Squeeze(front)), c.i64([1])),
                  op.Range(zero, op.Squeeze(op.Shape(kband, start=3, end=4)), one))
    if causal:
        near = op.And(op.GreaterOrEqual(diff, zero), op.LessOrEqual(diff, window))
    else:
        near = op.LessOrEqual(op.Abs(diff), window)
    # [c, band] + [B|1, 1, n, 1, band]: the heads share one additive mask
    band_bias = op.Add(op.Where(near, zero_f, masked),
                       op.Where(op.Greater(op.Transpose(mband, perm=[0, 1, 2, 4, 3]), half), zero_f, masked))
    b.masked_band = op.Add(scores, band_bias)
    if causal:
        b.sinks_1d = op.Reshape(c.attr("sinks", ir.AttributeType.INT), one_1d)
        ks = op.Slice(k, zero_1d, b.sinks_1d, axis2)
        b.vs5 = op.Unsqueeze(op.Slice(v, zero_1d, b.sinks_1d, axis2), axis2)
        ms = op.Slice(keymask, zero_1d, b.sinks_1d, axis2)
        scores_s = op.Mul(op.MatMul(qb, op.Unsqueeze(op.Transpose(ks, perm=[0, 1, 3, 2]), axis2)), scale)
        qpos = op.Add(op.Unsqueeze(op.Mul(op.Range(zero, op.Squeeze(n_blocks), one), c0), c.i64([1])), r)
        key_ids = op.Range(zero, op.Squeeze(op.Shape(ks, start=2, end=3)), one)
        outside = op.Greater(op.Sub(op.Unsqueeze(qpos, c.i64([-1])), key_ids), window)
        ms_on = op.Greater(op.Unsqueeze(op.Transpose(ms, perm=[0, 1, 3, 2]), axis2), half)
        b.sink_ok = op.And(outside, ms_on)
        b.masked_s = op.Where(b.sink_ok, scores_s, hidden)
    return b
