"""Decoding with causal linear attention (passes/mixers/state.py): a swapped layer's KV cache
becomes a fixed-size state. Model level: a prefill then token-by-token decoding of the swapped
cached decoder equals the swapped parallel (no cache) model; and the preconditions."""

from __future__ import annotations

import numpy as np
import pytest

import graphopt
import models
from graphopt.ir import ir
from graphopt.passes.mixers import MIXERS, swap_mixers
from graphopt.passes.mixers import state as mixer_state

pytestmark = pytest.mark.filterwarnings("ignore")

CACHED_DIMS = {"batch": 2, "seq": 4, "past": 6, "total": 10}
LENGTH = 12  # decoded tokens


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """Per arch: (cached decoder, the same weights without a cache), both through the exact preset."""
    tmp = tmp_path_factory.mktemp("decoders")
    out = {}
    for arch in ("gpt2", "llama"):
        cached = models.export_cached_decoder(arch, tmp / f"{arch}_cached.onnx", "legacy", presents=True)
        module, args, names, dynamic = models.transformer(arch, "eager")
        plain = models.export(module, args, names, dynamic, tmp / f"{arch}.onnx", "legacy")
        out[arch] = (graphopt.optimize(cached, dims=CACHED_DIMS).model, graphopt.optimize(plain, dims={"batch": 2, "seq": 16}).model)
    return out


def _ids():
    return np.random.default_rng(3).integers(0, 128, (2, LENGTH)).astype(np.int64)


def _decode(model: graphopt.Model, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Run `ids` through the swapped cached decoder: `prefill` tokens at once, then one at a
    time, feeding back every state (and kept KV cache) output."""
    inputs = {v.name: v for v in model.ir.graph.inputs}
    carried = {}
    for v in inputs.values():
        if v.name.startswith(("past_state", "past_normalizer")):
            carried[v.name] = np.zeros((2, *v.shape[1:]), np.float32)
        elif v.name.startswith("past_") and v.name != mixer_state.PAST_LENGTH:  # a kept layer's KV cache
            carried[v.name] = np.zeros((2, v.shape[1], 0, v.shape[3]), np.float32)
    outputs, done = [], 0
    for end in [prefill, *range(prefill + 1, ids.shape[1] + 1)]:
        feeds = {"input_ids": ids[:, done:end], "attention_mask": np.ones((2, end), np.int64), **carried}
        if mixer_state.PAST_LENGTH in inputs:
            feeds[mixer_state.PAST_LENGTH] = np.array([done], np.int64)
        result = graphopt.verify.run(model, feeds)
        outputs.append(result["last_hidden_state"])
        for name in carried:
            carried[name] = result[name.replace("past_state", "present_state").replace("past_normalizer", "present_normalizer")
                                   .replace("past_", "present_")]
        done = end
    return np.concatenate(outputs, axis=1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("mixer,features", [("linear:elu", 1), ("linear:hedgehog", 1), ("linear:hedgehog", 3),
                                            ("linear:performer", 1)])
def test_decoding_with_states_equals_the_parallel_model(decoders, arch, mixer, features):
    """Every layer swapped: the KV caches are gone, states and `past_length` replace them, and
    prefill + step-by-step decoding gives the parallel swapped model's outputs (fp32 tolerance).
    Hedgehog without fitting (identity W, seeded extra columns when wider) and Performer (seeded
    per layer) have the same parameters in both models; a 3x wider Hedgehog map carries a state
    of 6 x head size features."""
    cached, plain = decoders[arch]
    recurrent = swap_mixers(cached, mixer, steps=0, dims=CACHED_DIMS, features=features)
    assert recurrent.report["correction"]["why"].startswith("the swapped model reads decoding states")
    parallel = swap_mixers(plain, mixer, steps=0, dims={"batch": 2, "seq": 16}, correction=False,
                           features=features)  # the same weights
    if mixer == "linear:hedgehog":
        state = next(v for v in recurrent.model.ir.graph.inputs if v.name == "past_state.0")
        w = next(i for n, i in parallel.model.ir.graph.initializers.items() if n.startswith("w_hedgehog_"))  # [H, D, F]
        assert w.shape[-1] == features * w.shape[-2] and state.shape[2] == 2 * w.shape[-1]
    names = {v.name for v in recurrent.model.ir.graph.inputs}
    assert not any(n.startswith("past_") and n[5:].isdigit() for n in names)  # no KV cache left
    assert {"past_state.0", "past_normalizer.0", "past_state.1", "past_normalizer.1", mixer_state.PAST_LENGTH} <= names
    outputs = {v.name for v in recurrent.model.ir.graph.outputs}
    assert outputs == {"last_hidden_state", "present_state.0", "present_normalizer.0", "present_state.1", "present_normalizer.1"}
    ops = [n.op_type for n in recurrent.model.ir.graph]
    assert ops.count(f"LinearAttention{mixer.split(':')[1].capitalize()}Recurrent") == 2
    ids = _ids()
    want = graphopt.verify.run(parallel.model, {"input_ids": ids, "attention_mask": np.ones_like(ids)})["last_hidden_state"]
    np.testing.assert_allclose(_decode(recurrent.model, ids, prefill=5), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_decode(recurrent.model, ids, prefill=LENGTH), want, rtol=1e-4, atol=1e-5)
    assert recurrent.report["decode"]["removed"] == ["past_0", "past_1", "past_2", "past_3",
                                                     "present_0", "present_1", "present_2", "present_3"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_half_swapped_decoder_keeps_the_other_cache(decoders, arch):
    """Layer 1 swapped, layer 0 kept: layer 0 still has its KV cache, which also gives the past
    length (no `past_length` input); decoding equals the parallel model swapped the same way."""
    cached, plain = decoders[arch]
    recurrent = swap_mixers(cached, "linear:elu", steps=0, layers=[1], dims=CACHED_DIMS)
    parallel = swap_mixers(plain, "linear:elu", steps=0, layers=[1], dims={"batch": 2, "seq": 16}, correction=False)
    names = [v.name for v in recurrent.model.ir.graph.inputs]
    assert names == ["input_ids", "attention_mask", "past_0", "past_1", "past_state.1", "past_normalizer.1"]
    ids = _ids()
    want = graphopt.verify.run(parallel.model, {"input_ids": ids, "attention_mask": np.ones_like(ids)})["last_hidden_state"]
    np.testing.assert_allclose(_decode(recurrent.model, ids, prefill=5), want, rtol=1e-4, atol=1e-5)


def test_fidelity_of_the_recurrent_model_is_measured_with_the_past_as_state(decoders):
    """The end-to-end fidelity feeds the swapped model the state of the calibration data's past
    tokens, so it reads the same history as the original: with the exact softmax replaced by a
    linear mixer the outputs stay close but not equal, and a broken state would show."""
    cached, _ = decoders["gpt2"]
    report = swap_mixers(cached, "linear:hedgehog", steps=50, dims=CACHED_DIMS).report
    entry = report["end_to_end"]["last_hidden_state"]
    assert 0.9 < entry["mean_cosine"] < 1.0
    assert set(report["end_to_end"]) == {"last_hidden_state"}  # the KV cache outputs are gone


def _insert_after(model: graphopt.Model, value: ir.Value, op: str) -> None:
    readers = list(value.uses())
    node = ir.node(op, [value])
    node.outputs[0].dtype, node.outputs[0].shape = value.dtype, value.shape
    model.ir.graph.insert_after(value.producer(), node)
    for reader, index in readers:
        reader.replace_input_with(index, node.outputs[0])


def _value_concat(model: graphopt.Model) -> ir.Value:
    return next(n for n in model.ir.graph if n.op_type == "Concat" and n.inputs[0].name == "past_1").outputs[0]


def test_precondition_1_only_layout_ops_between_cache_and_attention(decoders):
    """A Neg between the value cache and the attention op: the layer is still swapped, in the
    parallel form over past + new keys, keeps its KV cache, and the report says why."""
    work = decoders["gpt2"][0].clone()
    _insert_after(work, _value_concat(work), "Neg")
    result = swap_mixers(work, "linear:elu", steps=0, dims=CACHED_DIMS)
    entry = result.report["per_layer"][0]
    assert entry["as"].startswith("LinearAttentionEluCausal") and "precondition 1" in entry["as"]
    assert "Recurrent" in result.report["per_layer"][1]["as"]
    names = [v.name for v in result.model.ir.graph.inputs]
    assert "past_0" in names and "past_1" in names and "past_state.1" in names and "past_state.0" not in names


def test_precondition_2_the_concatenated_cache_is_read_only_for_its_shape(decoders):
    work = decoders["gpt2"][0].clone()
    extra = ir.node("ReduceSum", [_value_concat(work)], attributes={"keepdims": 0})
    extra.outputs[0].name, extra.outputs[0].dtype = "cache_sum", ir.DataType.FLOAT
    work.ir.graph.append(extra)
    work.ir.graph.outputs.append(extra.outputs[0])
    result = swap_mixers(work, "linear:elu", steps=0, dims=CACHED_DIMS)
    assert "precondition 2" in result.report["per_layer"][0]["as"]
    assert "past_1" in [v.name for v in result.model.ir.graph.inputs]


def test_a_decoder_without_cache_keeps_the_parallel_form(decoders):
    _, plain = decoders["gpt2"]
    result = swap_mixers(plain, "linear:elu", steps=0, dims={"batch": 2, "seq": 16})
    assert "decode" not in result.report
    assert not any(n.op_type.endswith("Recurrent") for n in result.model.ir.graph)


@pytest.mark.parametrize("mixer", MIXERS)
def test_every_mixer_on_a_cached_decoder_runs(decoders, mixer):
    """Layers that read a KV cache: the linear mixers carry states (relu+dwc keeps the cache),
    the others run over past + new keys; every swapped model runs and keeps the output shape."""
    cached, _ = decoders["llama"]
    result = swap_mixers(cached, mixer, steps=5, dims=CACHED_DIMS)
    feeds = graphopt.feeds.make_inputs(result.model, dims=CACHED_DIMS)
    if mixer_state.PAST_LENGTH in feeds:
        feeds[mixer_state.PAST_LENGTH] = np.array([CACHED_DIMS["past"]], np.int64)
    out = graphopt.verify.run(result.model, feeds)
    assert out["last_hidden_state"].shape == (2, CACHED_DIMS["seq"], 32)
    assert all(np.isfinite(v).all() for v in out.values())
    recurrent = mixer.startswith("linear:") and mixer != "linear:relu+dwc"
    assert ("decode" in result.report) == recurrent


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_static_shape_dynamo_exports(tmp, arch):
    """torch.export cannot relate total = past + seq here, so the dynamo exports are static.
    GPT-2's cache path has no length constant and converts; Llama's GQA repeat expands to a
    constant holding the cache length (precondition 1): its layers keep the cache and run the
    causal form over past + new keys, which the report says."""
    path = models.export_cached_decoder(arch, tmp / "m.onnx", "dynamo", presents=True)
    result = swap_mixers(graphopt.optimize(path).model, "linear:elu", steps=0)
    entries = result.report["per_layer"]
    if arch == "gpt2":
        assert all("Recurrent" in e["as"] for e in entries) and "decode" in result.report
    else:
        assert all(e["as"].startswith("LinearAttentionEluCausalPast") and "static-shape export" in e["as"]
                   for e in entries)
        assert "decode" not in result.report
    assert next(iter(result.report["end_to_end"].values()))["mean_cosine"] > 0.9


def test_lowering_after_a_state_swap_gets_the_state_inputs(tmp):
    """optimize(preset="mixers", target="ort-cpu") on a cached decoder: the measured lowering
    runs the swapped model on the inputs converted to states (what feeds_for returns)."""
    path = models.export_cached_decoder("gpt2", tmp / "m.onnx", "legacy", presents=True)
    result = graphopt.optimize(path, preset="mixers", mixer="linear:elu", calib_steps=0, dims=CACHED_DIMS,
                               target="ort-cpu", use_cache=False)
    assert "decode" in result.report.fidelity and result.report.lowering is not None
    names = {v.name for v in result.model.ir.graph.inputs}
    assert {"past_state.0", mixer_state.PAST_LENGTH} <= names and "past_0" not in names
