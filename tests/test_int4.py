"""int4 weight-only MatMulNBits (issue 13, item 6): the packing computes x @ W~ in onnxruntime,
a decoder-shaped layer measured faster is rewritten, and the requests it refuses."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
from graphopt import verify
from graphopt.errors import InputError
from graphopt.passes.precision import int4
from graphopt.passes.precision.sites import find_sites
from rule_testing import build, header

pytestmark = pytest.mark.filterwarnings("ignore")


def _matmul(k: int, n: int, rows: int):
    return build(header(17) + f"g (float[{rows}, {k}] x) => (float[{rows}, {n}] y) <float[{k}, {n}] w> {{ y = MatMul(x, w) }}",
                 w=[k, n])


@pytest.mark.parametrize("k", [256, 200])  # 200: the last block padded
def test_the_packed_layer_multiplies_by_the_dequantized_weight(k):
    model = _matmul(k, 96, 8)
    (site,) = find_sites(model.ir.graph)
    work = model.clone()
    (mine,) = find_sites(work.ir.graph)
    int4.emit(work.ir.graph, mine)
    assert [n.op_type for n in work.ir.graph if n.op_type != "Constant"] == ["MatMulNBits"]
    x = np.random.default_rng(3).standard_normal([8, k]).astype(np.float32)
    got = verify.run(work, {"x": x})["y"]
    want = x @ int4.fake(site.w)  # int4 weights; the int8 activations of accuracy level 4 add a little
    assert verify.min_cosine({"y": want}, {"y": got}) > 0.9995
    w = site.w
    assert np.abs(int4.fake(w) - w).max() <= np.abs(w).max() / 14 + 1e-6  # half a step of the coarsest block
    exact = x @ w
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.2


def test_a_decoder_shaped_layer_goes_to_int4_where_faster():
    model = _matmul(2048, 2048, 1)  # one token of a decoder: bound by reading the weight
    feeds = graphopt.feeds.make_inputs(model, seed=1)
    result = graphopt.optimize(model, passes=["eliminate-dead-code"], precision="int4", fidelity=0.99, target="ort-cpu",
                               inputs=feeds, calib=[graphopt.feeds.make_inputs(model, seed=i) for i in range(4)])
    (entry,) = result.report.fidelity["layers"]
    assert entry["float_ms"] > 0 and entry["int4_ms"] > 0
    if entry["int4_ms"] < entry["float_ms"]:
        assert result.report.rewrites()["MatMulNBitsInt4"] == 1
        assert "MatMulNBits" in {n.op_type for n in result.model.graph}
        assert verify.min_cosine(verify.run(model, feeds), verify.run(result.model, feeds)) > 0.99
    else:
        assert "not faster" in entry["kept_because"] and "MatMulNBits" not in {n.op_type for n in result.model.graph}


def test_refusals():
    model = _matmul(64, 64, 4)
    with pytest.raises(InputError, match="contrib op"):
        graphopt.optimize(model, passes=["eliminate-dead-code"], precision="int4")
    gemm = build(header(17) + "g (float[4, 64] x) => (float[4, 64] y) <float[64, 64] w> { y = Gemm(x, w) }", w=[64, 64])
    with pytest.raises(InputError, match="no layer for int4"):
        graphopt.optimize(gemm, passes=["eliminate-dead-code"], precision="int4", target="ort-cpu")
