"""Token mixers (approximate): reference bodies against straightforward torch code, the
chunked causal form against the parallel one, swaps on real exports that still run in ORT,
calibration and the fidelity report."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
import torch

import graphopt
import models
from graphopt import functions
from graphopt.passes.mixers import dwc, edit, hybrid, linear, pool, transfer, window as window_mixer
from graphopt.errors import InputError
from graphopt.passes.mixers import MIXERS

pytestmark = pytest.mark.filterwarnings("ignore")


def _run_function(name: str, arrays: dict[str, np.ndarray], scale: float | None = 0.3, **attrs) -> np.ndarray:
    """Call graphopt function `name` on `arrays` in onnxruntime (attributes: scale unless None, `attrs`)."""
    inputs = list(arrays)
    attrs = ({"scale": scale} if scale is not None else {}) | attrs
    node = oh.make_node(name, inputs, ["Y"], domain=functions.DOMAIN, **attrs)
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info(k, 1, list(v.shape)) for k, v in arrays.items()],
                          [oh.make_tensor_value_info("Y", 1, None)])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)
    model = graphopt.load(proto)  # adds the function definitions
    return graphopt.verify.run(model, arrays)["Y"]


def _inputs(s=8, t=8, d=4, seed=0, padded=True):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 2, s, d)).astype(np.float32)
    kt = rng.standard_normal((2, 2, d, t)).astype(np.float32)
    v = rng.standard_normal((2, 2, t, d)).astype(np.float32)
    keymask = np.ones((2, 1, t, 1), np.float32)
    if padded:
        keymask[1, :, t - 3:] = 0
    return q, kt, v, keymask


def _weights(kind: str, d: int = 4):
    rng = np.random.default_rng(1)
    if kind == "Hedgehog":
        return (np.eye(d, dtype=np.float32) + 0.1 * rng.standard_normal((2, d, d))).astype(np.float32)
    if kind == "Performer":
        return rng.standard_normal((d, 4 * d)).astype(np.float32)
    return None


@pytest.mark.parametrize("kind", linear.MAPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("quadratic", [False, True])
def test_linear_bodies_match_torch(kind, causal, quadratic):
    t = 70 if causal and not quadratic else 8  # the chunked form pads 70 to two chunks of 64
    q, kt, v, keymask = _inputs(s=t, t=t)
    w = _weights(kind)
    arrays = {"Q": q, "KT": kt, "V": v, "keymask": keymask} | ({"W": w} if w is not None else {})
    got = _run_function(linear.linear_name(kind, causal, quadratic), arrays)
    want = linear.linear_attention(kind, *map(torch.as_tensor, (q, kt, v, keymask)), 0.3,
                                            None if w is None else torch.as_tensor(w), causal).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t", [1, 63, 64, 130])
def test_chunked_causal_equals_parallel_causal(t):
    q, kt, v, keymask = _inputs(s=t, t=t, seed=t)
    arrays = {"Q": q, "KT": kt, "V": v, "keymask": keymask}
    parallel = _run_function(linear.linear_name("Elu", True, True), arrays)
    for past in (False, True):  # with no keys before the queries, the Past form is the plain one
        chunked = _run_function(linear.linear_name("Elu", True, False, past=past), arrays)
        np.testing.assert_allclose(chunked, parallel, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_pool_body_matches_torch(causal):
    v = np.random.default_rng(0).standard_normal((2, 3, 9, 4)).astype(np.float32)
    q = np.zeros((2, 3, 9, 4), np.float32)  # only its length matters
    name = "CausalPoolMixer" if causal else "PoolMixer"
    got = _run_function(name, {"Q": q, "V": v}, scale=None)
    np.testing.assert_allclose(got, pool.pool(torch.as_tensor(v), causal).numpy(), rtol=1e-5, atol=1e-6)
    # with a KV cache the values hold 6 past tokens too: the rows of the 3 queries come out
    tail = _run_function(name, {"Q": q[:, :, :3], "V": v}, scale=None)
    np.testing.assert_allclose(tail, got[:, :, 6:], rtol=1e-6)
    if causal:  # no future token reaches an output
        v2 = v.copy()
        v2[:, :, 5:] += 1.0
        np.testing.assert_allclose(_run_function(name, {"Q": q, "V": v2}, scale=None)[:, :, :5], got[:, :, :5])


def test_performer_features_approximate_softmax_attention():
    """FAVOR+ is an unbiased estimate of the softmax kernel: with many random features the
    Performer reference approaches softmax attention at the same scale."""
    q, kt, v, _ = (torch.as_tensor(a) for a in _inputs(padded=False))
    w = torch.as_tensor(np.random.default_rng(0).standard_normal((4, 40000)).astype(np.float32))
    ones = torch.ones(1, 1, 1, 1)
    approx = linear.linear_attention("Performer", q, kt, v, ones, 0.3, w)
    exact = transfer.softmax_attention(q, kt, v, None, 0.3)
    assert float((approx - exact).norm() / exact.norm()) < 0.05


@pytest.fixture(scope="module")
def bert_and_gpt2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixers")
    out = {}
    for arch in ("bert", "gpt2"):
        module, args, names, dynamic = models.transformer(arch, "sdpa")
        out[arch] = models.export(module, args, names, dynamic, tmp / f"{arch}.onnx", "dynamo")
    return out


@pytest.mark.parametrize("mixer", MIXERS)
def test_swap_every_mixer_on_bert_runs_in_ort(bert_and_gpt2, mixer):
    result = graphopt.optimize(bert_and_gpt2["bert"], preset="mixers", mixer=mixer, dims={"batch": 2, "seq": 16},
                               calib_steps=5)
    fid = result.report.fidelity
    assert fid["layers_swapped"] == [0, 1] and fid["calibration"]["source"] == "generated"
    assert "no calibration data" in fid["calibration"]["warning"]
    assert result.report.rewrites()["SwapMixer"] == 2 and result.report.validation is None
    assert not graphopt.summary.attention_layers(result.model)  # no softmax attention left
    feeds = graphopt.feeds.make_inputs(result.model, dims={"batch": 2, "seq": 16})
    out = graphopt.verify.run(result.model, feeds)
    assert all(np.isfinite(v).all() for v in out.values())
    e2e = next(iter(fid["end_to_end"].values()))
    assert -1.0 <= e2e["mean_cosine"] <= 1.0 and len(fid["per_layer"]) == 2


def test_drop_bypasses_the_residual_add(bert_and_gpt2):
    exact = graphopt.optimize(bert_and_gpt2["bert"], dims={"batch": 2, "seq": 16}).model
    from graphopt.passes.mixers import swap_mixers

    result = swap_mixers(exact, "drop", layers=[0], steps=0, dims={"batch": 2, "seq": 16})
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("MaskedAttention") == 1 and "PoolMixer" not in ops
    assert ops.count("MatMul") < [n.op_type for n in exact.graph].count("MatMul")  # layer 0's projections are gone


def test_causal_layers_get_causal_mixers(bert_and_gpt2):
    result = graphopt.optimize(bert_and_gpt2["gpt2"], preset="mixers", mixer="linear:elu", dims={"batch": 2, "seq": 16},
                               calib_steps=0)
    names = {n.op_type for n in result.model.graph if n.domain == functions.DOMAIN}
    assert any("Causal" in n for n in names), names


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s", [12, 5])
def test_token_conv_body_matches_torch(causal, s):
    """SLAB's depthwise-conv branch: padded keys zeroed, the last S rows when T > S."""
    q, kt, v, keymask = _inputs(s=s, t=12)
    w = np.random.default_rng(2).standard_normal((2, dwc.CONV_KERNEL, 4)).astype(np.float32)
    got = _run_function("CausalTokenConv" if causal else "TokenConv", {"Q": q, "V": v, "keymask": keymask, "W": w},
                        scale=None)
    want = dwc.token_conv(*map(torch.as_tensor, (q, v, keymask, w)), causal).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # by hand: one output position
    vm = v * keymask
    i, h, c = s - 1, 1, 2
    pos = (12 - s) + i  # the query's position among the keys
    taps = range(pos - 4, pos + 1) if causal else range(pos - 2, pos + 3)
    expect = sum(w[h, j, c] * vm[0, h, t, c] for j, t in enumerate(taps) if 0 <= t < 12)
    np.testing.assert_allclose(got[0, h, i, c], expect, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def minilm_sentences():
    """MiniLM-L6 (real weights) through the exact preset, 32 calibration and 32 held-out sentences."""
    import sentences
    from mixer_fidelity import batches

    module, tokenizer = models.minilm()
    calib_texts, held_texts = sentences.split()
    calib, held = (batches(tokenizer, texts[:32], size=32)[0] for texts in (calib_texts, held_texts))
    model = graphopt.load(module, example_inputs=tuple(torch.as_tensor(calib[k]) for k in ("input_ids", "attention_mask")),
                          dynamic_shapes=models.DYNAMIC)
    return graphopt.optimize(model, inputs=calib).model, calib, held


def test_a_larger_calibration_set_never_holds_a_measured_sentence():
    """examples/sentences.py: more calibration sentences come from the same families with other
    seeds; the 135 measured ones stay the same and none of them is calibrated on."""
    import sentences

    calib, held = sentences.split()
    more, held_too = sentences.split(calibration=615)
    assert held_too == held and more[:len(calib)] == calib and len(more) == len(set(more)) == 615
    assert not set(more) & set(held)


def test_dwc_branch_lowers_the_error_of_relu_linear_attention(minilm_sentences):
    """linear:relu+dwc starts from plain relu (zero kernel) and fits the kernel on real
    MiniLM activations: every layer's held-out error drops, and the sentence embeddings move
    closer to the original's. (On random weights and tokens there is nothing to fit: the
    kernel then fits noise and the held-out error rises a little.)"""
    from graphopt.passes.mixers import swap_mixers

    exact, calib, held = minilm_sentences
    plain = swap_mixers(exact, "linear:relu", calib=[calib], holdout=[held], steps=0).report
    dwc = swap_mixers(exact, "linear:relu+dwc", calib=[calib], holdout=[held], steps=100)
    for before, after in zip(plain["per_layer"], dwc.report["per_layer"]):
        assert after["rel_error"] < before["rel_error"]
        assert after["as"].startswith("LinearAttentionRelu") and after["as"].endswith(" + TokenConv")
    cos = [next(iter(r["end_to_end"].values()))["mean_cosine"] for r in (plain, dwc.report)]
    assert cos[1] > cos[0]
    assert dwc.report["mixer"] == "linear:relu+dwc"
    assert sum(n.op_type == "TokenConv" for n in dwc.model.ir.graph) == 6


def test_output_correction_lowers_each_layer_error_and_keeps_the_shape(minilm_sentences):
    """Issue 17, item 1: each swapped layer's output projection is refitted against the
    original's output on real MiniLM activations: the held-out error of every corrected layer
    falls, the end-to-end held-out cosine does not, and the model has the same ops."""
    from graphopt.passes.mixers import swap_mixers

    exact, calib, held = minilm_sentences
    plain = swap_mixers(exact, "linear:relu", calib=[calib], holdout=[held], steps=0, correction=False)
    fixed = swap_mixers(exact, "linear:relu", calib=[calib], holdout=[held], steps=0)
    report = fixed.report["correction"]
    assert report["kept"] and len(report["layers"]) == 6
    corrected = [r for r in report["layers"] if r["corrected"]]
    assert len(corrected) >= 4 and all(r["rel_error_after"] < r["rel_error_before"] for r in corrected)
    assert all(r["rel_error_after"] == r["rel_error_before"] and "held-out" in r["why"]
               for r in report["layers"] if not r["corrected"])
    assert report["mean_cosine_after"] > report["mean_cosine_before"]
    cos = [next(iter(r.report["end_to_end"].values()))["mean_cosine"] for r in (plain, fixed)]
    assert cos[1] > cos[0] and cos[0] == pytest.approx(report["mean_cosine_before"], abs=1e-6)
    ops = [sorted(n.op_type for n in r.model.ir.graph) for r in (plain, fixed)]
    assert ops[0] == ops[1]
    inits = fixed.model.ir.graph.initializers
    for row in corrected:  # W + dW replaced W
        node = next(n for n in fixed.model.ir.graph if n.name == row["projection"])
        assert node.inputs[1].name.endswith("_corrected") and node.inputs[1].name in inits


def test_correction_solve_recovers_a_linear_change_and_leaves_an_exact_layer_alone():
    from graphopt.passes.mixers import correct

    rng = np.random.default_rng(0)
    x, xh = rng.standard_normal((400, 16)), rng.standard_normal((200, 16))
    w, b = rng.standard_normal((16, 8)), rng.standard_normal(8)
    w2, b2 = w + 0.3 * rng.standard_normal((16, 8)), b + 0.5
    got = correct.solve(x, x @ w2 + b2, w, b, xh, xh @ w2 + b2)
    assert got["rank"] == 8 and got["error"] < 1e-3 < got["error_before"]
    np.testing.assert_allclose(w + got["dw"], w2, atol=1e-2)
    np.testing.assert_allclose(b + got["db"], b2, atol=1e-2)
    same = correct.solve(x, x @ w + b, w, b, xh, xh @ w + b)  # nothing to correct: rank 0, no change
    assert same["rank"] == 0 and same["dw"] is None


@pytest.mark.parametrize("shape", [(16, 8), (8, 16), (12, 12)])
def test_correction_truncations_are_the_svd_ones(shape):
    """Each rank-r truncation equals the one from the SVD, on full-rank and rank-deficient dW."""
    from graphopt.passes.mixers import correct

    rng = np.random.default_rng(3)
    full = rng.standard_normal(shape)
    deficient = rng.standard_normal((shape[0], 3)) @ rng.standard_normal((3, shape[1]))
    for dw in (full, deficient):
        u, sv, vt = np.linalg.svd(dw, full_matrices=False)
        got = correct.truncations(dw, [1, 3, 5, min(shape)])
        for r, dw_r in got.items():
            np.testing.assert_allclose(dw_r, (u[:, :r] * sv[:r]) @ vt[:r], rtol=1e-7, atol=1e-9)


def test_correction_needs_a_projection_after_the_attention(bert_and_gpt2):
    """A layer whose attention output reaches anything but one constant MatMul (through layout
    ops) is left alone, and the report says why."""
    from graphopt.passes.mixers import correct, spec as specs
    from graphopt.ir import ir

    exact = graphopt.optimize(bert_and_gpt2["bert"], dims={"batch": 2, "seq": 16}).model
    node = specs.attention_nodes(exact.ir.graph)[0]
    assert correct.find_projection(node) is not None
    work = exact.clone()
    node = specs.attention_nodes(work.ir.graph)[0]
    extra = ir.node("Relu", [node.outputs[0]], name="also_reads_the_attention")
    work.ir.graph.insert_after(node, [extra])
    assert correct.find_projection(node) is None


def test_best_n_ranks_layers_by_their_end_to_end_effect(bert_and_gpt2):
    """Issue 17, item 3: best:N takes the layers whose swap alone moves the output least."""
    from graphopt.passes.mixers import swap_mixers

    exact = graphopt.optimize(bert_and_gpt2["bert"], dims={"batch": 2, "seq": 16}).model
    report = swap_mixers(exact, "linear:elu", layers="best:1", steps=0, dims={"batch": 2, "seq": 16},
                         correction=False).report
    alone = [e["alone_mean_cosine"] for e in report["per_layer"]]
    assert report["layers_swapped"] == [int(np.argmax(alone))]
    assert "end-to-end" in report["per_layer"][1 - int(np.argmax(alone))]["kept_because"]


def test_hybrid_is_never_worse_than_its_parts_on_held_out_data(minilm_sentences):
    """Issue 17, item 2: each head starts from the better part; the held-out checks keep the
    best point, the parts themselves included."""
    from graphopt.passes.mixers import swap_mixers

    exact, calib, held = minilm_sentences
    report = swap_mixers(exact, "hybrid", calib=[calib], holdout=[held], layers=[0, 1], steps=40,
                         correction=False).report
    for entry in report["per_layer"][:2]:
        errors = entry["held_rel_errors"]
        assert entry["chosen"] == min(errors, key=errors.get)
        assert set(entry["start"]) <= {"window", "linear"} and len(entry["start"]) == 12
        assert 2 * entry["window"] + 1 <= 0.25 * np.median(calib["attention_mask"].sum(1))  # a quarter of a sentence


def test_fit_stops_where_the_held_out_error_is_lowest():
    """transfer.fit with a held-out check ends at the best checked point: here the fit data
    pull p towards 1 while the held-out error is lowest at p = 0.4, between the checks."""
    p = torch.nn.Parameter(torch.zeros(1))
    best = transfer.fit([p], lambda _b: ((p - 1) ** 2).sum(), [None], steps=200, seed=0, lr=0.05,
                        check=lambda: float(((p - 0.4) ** 2).sum()), every=5)
    assert 0.2 < float(p) < 0.6 and best == pytest.approx(float(((p.detach() - 0.4) ** 2).sum()))
    unchecked = torch.nn.Parameter(torch.zeros(1))
    assert transfer.fit([unchecked], lambda _b: ((unchecked - 1) ** 2).sum(), [None], steps=200, seed=0, lr=0.05) is None
    assert float(unchecked) > 0.9


def test_hedgehog_fit_reduces_the_layer_error(bert_and_gpt2):
    exact = graphopt.optimize(bert_and_gpt2["bert"], dims={"batch": 4, "seq": 16}).model
    from graphopt.passes.mixers import swap_mixers

    calib = graphopt.feeds.make_inputs(exact, dims={"batch": 8, "seq": 16})
    untrained = swap_mixers(exact, "linear:hedgehog", calib=calib, steps=0).report
    trained = swap_mixers(exact, "linear:hedgehog", calib=calib, steps=150).report
    for before, after in zip(untrained["per_layer"], trained["per_layer"]):
        assert after["rel_error"] < before["rel_error"]


def test_auto_layers_respect_the_fidelity_threshold(bert_and_gpt2):
    exact = graphopt.optimize(bert_and_gpt2["bert"], dims={"batch": 4, "seq": 16}).model
    from graphopt.passes.mixers import swap_mixers

    calib = graphopt.feeds.make_inputs(exact, dims={"batch": 8, "seq": 16})
    strict = swap_mixers(exact, "linear:relu", calib=calib, layers="auto", fidelity=0.9999999, steps=0).report
    assert strict["layers_swapped"] == [] and all("end-to-end mean cosine" in e["kept_because"] for e in strict["per_layer"])
    loose = swap_mixers(exact, "linear:relu", calib=calib, layers="auto", fidelity=-1.0, steps=0).report
    assert loose["layers_swapped"] == [0, 1]


def test_a_wider_hedgehog_map_in_every_body():
    """features = 3: W [H, D, 3 D] (6 D features): the linear forms (non-causal, chunked causal)
    and the banded hybrid give their torch references' outputs."""
    q, kt, v, keymask = _inputs(s=70, t=70)
    rng = np.random.default_rng(2)
    w = np.concatenate([np.tile(np.eye(4, dtype=np.float32), (2, 1, 1)), 0.3 * rng.standard_normal((2, 4, 8))], -1)
    w = w.astype(np.float32)
    for causal in (False, True):
        got = _run_function(linear.linear_name("Hedgehog", causal, False), {"Q": q, "KT": kt, "V": v, "keymask": keymask, "W": w})
        want = linear.linear_attention("Hedgehog", *map(torch.as_tensor, (q, kt, v, keymask)), 0.3, torch.as_tensor(w), causal)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
        gamma = np.array([0.5, 2.0], np.float32).reshape(1, 2, 1, 1)
        attrs = {"scale": 0.3, "window": 5, "sinks": 2 if causal else 0}
        banded = _run_function(hybrid.banded_name(causal), {"Q": q, "KT": kt, "V": v, "keymask": keymask, "W": w, "G": gamma},
                               **attrs)
        bias = torch.as_tensor(_mask_bias(keymask, 70, causal))
        want = hybrid.hybrid_attention(*map(torch.as_tensor, (q, kt, v)), bias, 0.3, 5, attrs["sinks"], torch.as_tensor(w),
                                       torch.as_tensor(gamma)).numpy()
        real = keymask[:, 0, :, 0] > 0
        np.testing.assert_allclose(banded.transpose(0, 2, 1, 3)[real], want.transpose(0, 2, 1, 3)[real], rtol=1e-4, atol=1e-5)


def test_wider_hedgehog_maps_are_fitted_and_reported(bert_and_gpt2):
    from graphopt.passes.mixers import swap_mixers

    exact = graphopt.optimize(bert_and_gpt2["bert"], dims={"batch": 2, "seq": 16}).model
    for mixer in ("linear:hedgehog", "hybrid"):
        result = swap_mixers(exact, mixer, steps=5, dims={"batch": 2, "seq": 16}, features=2, correction=False)
        assert result.report["features"] == 2
        weights = [i for name, i in result.model.ir.graph.initializers.items() if name.startswith(("w_hedgehog_", "w_hybrid_w_"))]
        assert len(weights) == 2 and all(i.shape[-1] == 2 * i.shape[-2] for i in weights)
        out = graphopt.verify.run(result.model, graphopt.feeds.make_inputs(result.model, dims={"batch": 2, "seq": 16}))
        assert all(np.isfinite(a).all() for a in out.values())


def test_bad_mixer_requests(bert_and_gpt2):
    with pytest.raises(InputError, match="needs a mixer"):
        graphopt.optimize(bert_and_gpt2["bert"], preset="mixers", dims={"batch": 2, "seq": 16})
    with pytest.raises(InputError, match="unknown mixer"):
        graphopt.optimize(bert_and_gpt2["bert"], preset="mixers", mixer="linear:cosine", dims={"batch": 2, "seq": 16})
    with pytest.raises(InputError, match="attention layers 0..1"):
        graphopt.optimize(bert_and_gpt2["bert"], preset="mixers", mixer="pool", layers=[5], dims={"batch": 2, "seq": 16})
    with pytest.raises(InputError, match="widens a Hedgehog feature map; mixer 'linear:elu' has none"):
        graphopt.optimize(bert_and_gpt2["bert"], preset="mixers", mixer="linear:elu", features=2, dims={"batch": 2, "seq": 16})
    with pytest.raises(InputError, match="at least 1"):
        graphopt.optimize(bert_and_gpt2["bert"], preset="mixers", mixer="hybrid", features=0, dims={"batch": 2, "seq": 16})


def test_window_body_matches_torch():
    q, kt, v, keymask = _inputs(s=10, t=10)
    bias = np.where(keymask.transpose(0, 1, 3, 2) > 0, 0.0, -3.4e38).astype(np.float32)  # [2, 1, 1, 10]
    got = _run_function("WindowAttention", {"Q": q, "KT": kt, "V": v, "B": bias}, window=2, sinks=1)
    want = window_mixer.window_attention(*map(torch.as_tensor, (q, kt, v, bias)), 0.3, 2, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _mask_bias(keymask, t, causal):
    hidden = np.float32(np.finfo(np.float32).min)
    bias = np.where(keymask.transpose(0, 1, 3, 2) > 0, 0.0, hidden).astype(np.float32)  # [B, 1, 1, T]
    if causal:
        bias = np.maximum(bias + np.where(np.arange(t)[None, :] > np.arange(t)[:, None], hidden, 0.0), hidden)
    return bias.astype(np.float32)


BAND_CASES = [(1, 2), (5, 1), (13, 3), (40, 8), (40, 0), (9, 20), (33, 5), (70, 7), (100, 37)]  # odd windows: blocks of ceil(w / 2); causal hybrid: at least 16


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t,window", BAND_CASES)
def test_banded_window_body_equals_the_full_one(causal, t, window):
    """Computing only the band gives the full body's output when the bias is the padding mask
    (plus the causal mask), sinks included (causal layers: 2 sinks)."""
    q, kt, v, keymask = _inputs(s=t, t=t, seed=t, padded=t > 4)
    attrs = {"scale": 0.3, "window": window, "sinks": 2 if causal else 0}
    full = _run_function("WindowAttention", {"Q": q, "KT": kt, "V": v, "bias": _mask_bias(keymask, t, causal)}, **attrs)
    banded = _run_function(window_mixer.banded_name(causal), {"Q": q, "KT": kt, "V": v, "keymask": keymask}, **attrs)
    real = keymask[:, 0, :, 0] > 0  # padded queries are not compared (their rows see no key)
    np.testing.assert_allclose(banded.transpose(0, 2, 1, 3)[real], full.transpose(0, 2, 1, 3)[real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t,window", BAND_CASES)
def test_banded_hybrid_body_equals_the_full_one(causal, t, window):
    """The hybrid with only the band scored (its softmax over the band and sinks, linear
    attention over every key as running or total sums) gives the full hybrid body's output."""
    q, kt, v, keymask = _inputs(s=t, t=t, seed=t, padded=t > 4)
    w = _weights("Hedgehog")
    gamma = np.array([0.5, 2.0], np.float32).reshape(1, 2, 1, 1)
    attrs = {"scale": 0.3, "window": window, "sinks": 2 if causal else 0}
    full = _run_function("HybridAttention", {"Q": q, "KT": kt, "V": v, "B": _mask_bias(keymask, t, causal), "W": w,
                                         "G": gamma}, **attrs)
    banded = _run_function(hybrid.banded_name(causal), {"Q": q, "KT": kt, "V": v, "keymask": keymask, "W": w,
                                                           "G": gamma}, **attrs)
    real = keymask[:, 0, :, 0] > 0
    assert np.isfinite(banded).all()  # padded queries too: no NaN to leak into later layers
    np.testing.assert_allclose(banded.transpose(0, 2, 1, 3)[real], full.transpose(0, 2, 1, 3)[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("mixer", ["window", "hybrid"])
def test_window_swap_computes_only_the_band_when_the_bias_is_a_mask(bert_and_gpt2, arch, mixer):
    """The calibration sees biases that only hide keys (padding, causal): the swap uses the
    banded body, and the model computes what the full-score body gives with the same windows."""
    from graphopt.passes.mixers import swap_mixers
    from graphopt.passes import mixers as mixer_pass
    from graphopt.shapes import infer_shapes

    dims = {"batch": 2, "seq": 16}
    exact = graphopt.optimize(bert_and_gpt2[arch], dims=dims).model
    result = swap_mixers(exact, mixer, steps=20, dims=dims, correction=False)  # the bodies alone are compared
    banded = (window_mixer.banded_name if mixer == "window" else hybrid.banded_name)(arch == "gpt2")
    assert [e["as"].split(" ")[0] for e in result.report["per_layer"]] == [banded, banded]
    full = exact.clone()
    infer_shapes(full.ir)
    weights = [{"window": e["window"], "mask_only": False} for e in result.report["per_layer"]]
    if mixer == "hybrid":  # the fitted parameters, read back from the swapped model
        inits = result.model.ir.graph.initializers
        for i, node in enumerate(n for n in result.model.ir.graph if n.op_type == banded):
            weights[i] |= {"W": inits[node.inputs[4].name].const_value.numpy(),
                           "gamma": inits[node.inputs[5].name].const_value.numpy()}
    for i, node in enumerate(mixer_pass.attention_nodes(full.ir.graph)):
        mixer_pass.swap(full.ir, node, mixer_pass.MixerSpec.parse(mixer), weights[i], layer=i)
    full_op = "WindowAttention" if mixer == "window" else "HybridAttention"
    assert sum(n.op_type == full_op for n in full.ir.graph) == 2
    feeds = graphopt.feeds.make_inputs(exact, dims=dims, seed=5)
    feeds["attention_mask"][1, 11:] = 0
    got, want = (graphopt.verify.run(m, feeds) for m in (result.model, full))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_window_sizes_come_from_calibration(bert_and_gpt2):
    result = graphopt.optimize(bert_and_gpt2["gpt2"], preset="mixers", mixer="window", dims={"batch": 2, "seq": 16})
    layers = result.report.fidelity["per_layer"]
    assert all(0 <= e["window"] <= 15 and e["sinks"] == 4 for e in layers)
    windows = [n.attributes.get_int("window") for n in result.model.graph if n.op_type.startswith("WindowAttention")]
    assert windows == [e["window"] for e in layers]
    capped = graphopt.optimize(bert_and_gpt2["gpt2"], preset="mixers", mixer="window", dims={"batch": 2, "seq": 16},
                               max_window=2).report.fidelity["per_layer"]
    assert [e["window"] for e in capped] == [min(e["window"], 2) for e in layers]


def test_drop_reports_residual_redundancy_and_ranks_by_end_to_end_effect(bert_and_gpt2):
    exact = graphopt.optimize(bert_and_gpt2["bert"], dims={"batch": 2, "seq": 16}).model
    from graphopt.passes.mixers import swap_mixers

    report = swap_mixers(exact, "drop", layers="best:1", steps=0, dims={"batch": 2, "seq": 16}).report
    scores = [e["redundancy"] for e in report["per_layer"]]
    assert all(-1.0 <= s <= 1.0 for s in scores)
    alone = [e["alone_mean_cosine"] for e in report["per_layer"]]
    assert report["layers_swapped"] == [int(np.argmax(alone))]  # the layer whose drop moves the output least


@pytest.mark.parametrize("kind", linear.MAPS)
def test_recurrent_steps_equal_the_parallel_causal_form(kind):
    """A prefill of 5 tokens then decoding token by token with the fixed-size state gives the
    parallel causal output; so does one prefill of all 70 (two chunks, one padded)."""
    t = 70
    q, kt, v, keymask = _inputs(s=t, t=t)
    w = _weights(kind)
    extra = {"W": w} if w is not None else {}
    parallel = _run_function(linear.linear_name(kind, True, True), {"Q": q, "KT": kt, "V": v, "keymask": keymask} | extra)
    f = {"Elu": 4, "Relu": 4, "Hedgehog": 8, "Performer": 16}[kind]
    node = oh.make_node(linear.recurrent_name(kind), ["Q", "KT", "V", "keymask", "state", "normalizer", *extra],
                        ["Y", "S", "Z"], domain=functions.DOMAIN, scale=0.3)
    shapes = {"Q": [2, 2, "s", 4], "KT": [2, 2, 4, "s"], "V": [2, 2, "s", 4], "keymask": [2, 1, "s", 1],
              "state": [2, 2, f, 4], "normalizer": [2, 2, f, 1]} | {k: list(a.shape) for k, a in extra.items()}
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info(k, 1, s) for k, s in shapes.items()],
                          [oh.make_tensor_value_info(n, 1, None) for n in ("Y", "S", "Z")])
    model = graphopt.load(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=10))

    def decode(bounds):
        state, normalizer, outputs = np.zeros((2, 2, f, 4), np.float32), np.zeros((2, 2, f, 1), np.float32), []
        for a, b in zip(bounds, bounds[1:]):
            step = {"Q": q[:, :, a:b], "KT": kt[..., a:b], "V": v[:, :, a:b], "keymask": keymask[:, :, a:b],
                    "state": state, "normalizer": normalizer} | extra
            result = graphopt.verify.run(model, step)
            outputs.append(result["Y"])
            state, normalizer = result["S"], result["Z"]
        return np.concatenate(outputs, axis=2)

    np.testing.assert_allclose(decode([0, 5, *range(6, t + 1)]), parallel, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(decode([0, t]), parallel, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["Elu", "Hedgehog"])
@pytest.mark.parametrize("s", [1, 3, 70])
def test_chunked_causal_with_past_keys_equals_quadratic(kind, s):
    """T > S (keys of a KV cache before the queries): the chunked form takes the past keys as
    its initial state and matches the masked quadratic form (offset T - S)."""
    q, kt, v, keymask = _inputs(s=s, t=s + 9, seed=s)
    w = _weights(kind)
    arrays = {"Q": q, "KT": kt, "V": v, "keymask": keymask} | ({"W": w} if w is not None else {})
    chunked = _run_function(linear.linear_name(kind, True, False, past=True), arrays)
    quadratic = _run_function(linear.linear_name(kind, True, True), arrays)
    np.testing.assert_allclose(chunked, quadratic, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_keymask_pushdown_equals_slicing_the_full_bias(arch, tmp):
    """Taking the last row before the ops that build a causal+padding bias gives the same key mask."""
    from graphopt.passes import mixers as mixer_pass
    from graphopt.shapes import infer_shapes

    module, args, names, dynamic = models.transformer(arch, "sdpa")
    path = models.export(module, args, names, dynamic, tmp / "m.onnx", "dynamo")
    work = graphopt.optimize(path, dims={"batch": 2, "seq": 16}).model.clone()
    infer_shapes(work.ir)
    node = mixer_pass.attention_nodes(work.ir.graph)[0]
    outputs = []
    for pushdown in (False, True):
        builder = edit.Builder(work.ir, node)
        mask = edit.keymask(builder, pushdown=pushdown)
        work.ir.graph.insert_before(node, builder.nodes)
        mask.name, mask.type = f"keymask_{pushdown}", graphopt.ir.ir.TensorType(graphopt.ir.ir.DataType.FLOAT)
        work.ir.graph.outputs.append(mask)
        outputs.append(mask.name)
    assert any(n.op_type == "Slice" and n.inputs[0] is not node.inputs[3] for n in work.graph)  # pushed down
    feeds = graphopt.feeds.make_inputs(work, dims={"batch": 2, "seq": 16})
    feeds["attention_mask"][1, 10:] = 0  # one padded row
    result = graphopt.verify.run(work, feeds)
    np.testing.assert_array_equal(result[outputs[0]], result[outputs[1]])
    assert result[outputs[1]][1, 0, 10:, 0].sum() == 0 and result[outputs[1]][0].min() == 1


def test_hybrid_body_matches_torch():
    q, kt, v, keymask = _inputs(s=12, t=12)
    bias = np.where(keymask.transpose(0, 1, 3, 2) > 0, 0.0, -3.4e38).astype(np.float32)
    w = _weights("Hedgehog")
    gamma = np.array([0.5, 2.0], np.float32).reshape(1, 2, 1, 1)
    got = _run_function("HybridAttention", {"Q": q, "KT": kt, "V": v, "B": bias, "W": w, "G": gamma}, window=2, sinks=1)
    want = hybrid.hybrid_attention(*map(torch.as_tensor, (q, kt, v, bias)), 0.3, 2, 1, torch.as_tensor(w),
                                            torch.as_tensor(gamma)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # it holds both of its parts: gamma = 0 is window attention, a huge gamma linear attention
    args = tuple(map(torch.as_tensor, (q, kt, v, bias)))
    window_only = hybrid.hybrid_attention(*args, 0.3, 2, 1, torch.as_tensor(w), torch.zeros(1, 2, 1, 1))
    torch.testing.assert_close(window_only, window_mixer.window_attention(*args, 0.3, 2, 1), rtol=1e-5, atol=1e-6)
    got_zero = _run_function("HybridAttention", {"Q": q, "KT": kt, "V": v, "B": bias, "W": w,
                                                 "G": np.zeros((1, 2, 1, 1), np.float32)}, window=2, sinks=1)
    np.testing.assert_allclose(got_zero, window_only.numpy(), rtol=1e-5, atol=1e-6)
    linear_only = hybrid.hybrid_attention(*args, 0.3, 2, 1, torch.as_tensor(w), torch.full((1, 2, 1, 1), 1e12))
    want_linear = linear.linear_attention("Hedgehog", args[0], args[1], args[2], torch.as_tensor(keymask), 0.3,
                                          torch.as_tensor(w))
    torch.testing.assert_close(linear_only, want_linear, rtol=1e-4, atol=1e-5)


def test_a_model_without_attention_is_refused_with_what_inspect_found(tmp):
    """Issue 14, item 5: not "run the exact preset first" when the preset just ran."""
    import convnets

    path = convnets.export(convnets.trained(convnets.RepVGGBlock), tmp / "repvgg.onnx", "legacy")
    with pytest.raises(InputError, match="no attention layers: nothing for a token mixer.*inspect finds none.*Conv"):
        graphopt.optimize(path, preset="mixers", mixer="linear:elu", dims={"batch": 2})


CONSTANT_BIAS = """
g (float[B, 6, 8] x) => (float[B, 6, 8] y) <float[8, 8] wq, float[8, 8] wk, float[8, 8] wv, float[8, 8] wo, float[1, 2, 6, 6] rel> {
    q0 = MatMul(x, wq)
    k0 = MatMul(x, wk)
    v0 = MatMul(x, wv)
    shp = Constant<value = int64[4] {0, 6, 2, 4}>()
    q1 = Reshape(q0, shp)
    k1 = Reshape(k0, shp)
    v1 = Reshape(v0, shp)
    q = Transpose<perm = [0, 2, 1, 3]>(q1)
    k = Transpose<perm = [0, 2, 3, 1]>(k1)
    v = Transpose<perm = [0, 2, 1, 3]>(v1)
    s = MatMul(q, k)
    sb = Add(s, rel)
    p = Softmax<axis = -1>(sb)
    o = MatMul(p, v)
    ot = Transpose<perm = [0, 2, 1, 3]>(o)
    back = Constant<value = int64[3] {0, 6, 8}>()
    om = Reshape(ot, back)
    y = MatMul(om, wo)
}"""


@pytest.mark.parametrize("mixer", ["window", "linear:elu", "pool"])
def test_attention_with_a_constant_bias_is_captured(mixer):
    """BEiT's relative position bias (and DeiT's folded inputs in dynamo exports) are constants
    among the canonical op's inputs: read from the model, not run (once a KeyError)."""
    from rule_testing import build, header

    model = build(header(18) + CONSTANT_BIAS, wq=[8, 8], wk=[8, 8], wv=[8, 8], wo=[8, 8], rel=[1, 2, 6, 6])
    result = graphopt.optimize(model, preset="mixers", mixer=mixer, fidelity=0.0, dims={"B": 2})
    step = result.report.passes[-1]
    assert step.status == "applied" and step.fidelity["layers_swapped"] == [0], step


HELD_OUT = {  # architectures of the held-out export zoo (issue 27 item 6), tiny, random weights
    "gpt_neox": ("GPTNeoXModel", "GPTNeoXConfig", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=64, max_position_embeddings=64)),
    "phi3": ("Phi3Model", "Phi3Config", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64, pad_token_id=0)),
    "swin": ("SwinModel", "SwinConfig", dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, image_size=32, patch_size=4)),
}


def _held_out_export(arch, exporter, tmp):
    import transformers

    model_cls, config_cls, kwargs = HELD_OUT[arch]
    torch.manual_seed(0)
    module = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs, attn_implementation="eager")).eval()
    if arch == "swin":
        return models.export(models.PixelLastHidden(module), (torch.randn(2, 3, 32, 32),), ["pixel_values"],
                             {"pixel_values": {0: "batch"}}, tmp / "m.onnx", exporter)
    return models.export(models.LastHidden(module), models.token_inputs(128, 2, 16), ["input_ids", "attention_mask"],
                         models.DYNAMIC, tmp / "m.onnx", exporter)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt_neox", "phi3"])
def test_heads_are_read_through_legacy_partial_rotary_reshapes(arch, tmp):
    """Legacy GPT-NeoX and Phi-3 exports: view(batch, seq, -1, head) and a rotary slice whose end
    is computed; shape refinement gives the heads, so Hedgehog (which needs them) swaps both layers."""
    path = _held_out_export(arch, "legacy", tmp)
    layers = graphopt.summary.attention_layers(graphopt.load(path))
    assert [(a["heads"], a["kv_heads"], a["head_size"]) for a in layers] == [(4, 4, 8)] * 2
    result = graphopt.optimize(path, preset="mixers", mixer="linear:hedgehog", fidelity=0.0, dims={"batch": 2, "seq": 16})
    assert result.report.passes[-1].fidelity["layers_swapped"] == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("mixer", ["window", "linear:hedgehog"])
def test_mixers_on_swin_windowed_attention(exporter, mixer, tmp):
    """Swin's windowed attention adds a constant relative position bias (once a KeyError)."""
    path = _held_out_export("swin", exporter, tmp)
    result = graphopt.optimize(path, preset="mixers", mixer=mixer, fidelity=0.0, dims={"batch": 2})
    assert result.report.passes[-1].fidelity["layers_swapped"] == [0, 1]
