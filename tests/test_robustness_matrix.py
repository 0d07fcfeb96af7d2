"""The robustness matrix (issue 14): every architecture of the model matrix, exported by both
exporters, with and without an attention-mask input and (decoders) with a KV cache, in eager and
SDPA attention. On each: mixers with `--layers all` swap every attention layer and the result
loads and runs in onnxruntime with its fidelity report; and the exact-preset model compiles with
TVM for llvm and matches onnxruntime.

Mixers: one per graph edit on every form (the linear body with ELU features, the linear body
with its depthwise-conv branch, window, hybrid, pool, drop); the linear body's other feature maps
(ReLU, Hedgehog, Performer) change no edit, and run on one form per architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphopt
import models

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

ARCHS = ("bert", "distilbert", "roberta", "gpt2", "llama", "mistral", "qwen2", "vit")
DECODERS = ("gpt2", "llama", "mistral", "qwen2")
EVERY_FORM = ("linear:elu", "linear:relu+dwc", "window", "hybrid", "pool", "drop")
ONE_FORM = ("linear:relu", "linear:hedgehog", "linear:performer")


def _forms() -> list[str]:
    forms = []
    for arch in ARCHS:
        for exporter in ("dynamo", "legacy"):
            forms += [f"{arch}-{exporter}-eager-mask", f"{arch}-{exporter}-sdpa-mask"]
            if arch != "vit":
                forms.append(f"{arch}-{exporter}-eager-nomask")
            if arch in DECODERS:
                forms.append(f"{arch}-{exporter}-eager-kv")
    return forms


FORMS = _forms()


def _dims(form: str) -> dict[str, int]:
    return models.form_dims(form.split("-")[3])


def _exact(form: str) -> graphopt.Model:
    arch, exporter, attn, variant = form.split("-")
    _, result = models.optimized_export(arch, attn, exporter, variant)  # the model matrix made most of them
    assert result.report.validation.passed, result.report.validation.to_dict()
    return result.model


def _cases():
    cases = [(form, mixer) for form in FORMS for mixer in EVERY_FORM]
    cases += [(f"{arch}-dynamo-eager-mask", mixer) for arch in ARCHS for mixer in ONE_FORM]
    return cases


@pytest.mark.parametrize("form, mixer", _cases())
def test_every_mixer_swaps_every_layer(form, mixer):
    exact = _exact(form)
    layers = len(graphopt.summary.attention_layers(exact))
    dims = _dims(form)
    result = graphopt.optimize(exact, passes=["eliminate-dead-code"], mixer=mixer, layers="all", dims=dims, calib_steps=3)
    fid = result.report.fidelity
    assert layers == 2 and fid["layers_swapped"] == list(range(layers)) and fid["layers_total"] == layers
    assert result.report.rewrites()["SwapMixer"] == layers
    e2e = fid["end_to_end"]
    assert e2e and all(-1.0 <= v["mean_cosine"] <= 1.0 for v in e2e.values())
    feeds = graphopt.feeds.make_inputs(result.model, dims=dims, seed=3)
    out = graphopt.verify.run(result.model, feeds)  # loads and runs in onnxruntime
    assert out and all(np.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("form", FORMS)
def test_every_model_compiles_with_tvm_and_matches(form):
    pytest.importorskip("tvm", reason="the tvm extra is not installed")
    from graphopt.backends import tvm as tvm_backend

    exact = _exact(form)
    feeds = graphopt.feeds.make_inputs(exact, dims=_dims(form), seed=5)
    compiled = tvm_backend.compile(exact, shapes={k: v.shape for k, v in feeds.items()})
    got = tvm_backend.prepare(compiled).run(feeds)
    want = graphopt.verify.run(exact, feeds)
    for name, ref in want.items():
        check = graphopt.verify.compare_arrays(name, ref, got[name], rtol=1e-5, atol=1e-5)
        assert check.passed, check


class _Rank2MaskBlock(torch.nn.Module):
    """Pre-LN attention whose causal mask is a [S, T] tensor (rank 2), as hand-written decoders
    and older exports build it: the form on which linear mixers failed to load (a 4-D Transpose
    on the rank-2 bias) and window mixers failed to calibrate (an IndexError)."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.d = heads, d
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(3))
        self.out, self.norm = torch.nn.Linear(d, d), torch.nn.LayerNorm(d)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (lin(self.norm(x)).reshape(b, t, self.heads, self.d // self.heads).transpose(1, 2) for lin in self.qkv)
        mask = torch.triu(torch.full((t, t), torch.finfo(torch.float32).min), 1)
        p = torch.softmax(q @ k.transpose(-1, -2) * (self.d // self.heads) ** -0.5 + mask, -1)
        return x + self.out((p @ v).transpose(1, 2).reshape(b, t, self.d))


class _Rank2MaskDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.blocks = torch.nn.Embedding(64, 32), torch.nn.Sequential(_Rank2MaskBlock(), _Rank2MaskBlock())

    def forward(self, input_ids):
        return self.blocks(self.embed(input_ids))


@pytest.fixture(scope="module")
def rank2_decoder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rank2") / "decoder.onnx"
    torch.onnx.export(_Rank2MaskDecoder().eval(), (torch.randint(0, 64, (2, 16)),), str(path), dynamo=False,
                      opset_version=17, input_names=["input_ids"], dynamic_axes={"input_ids": {0: "batch", 1: "seq"}})
    result = graphopt.optimize(path, dims=models.MATRIX_DIMS)
    assert result.report.validation.passed
    return result.model


@pytest.mark.parametrize("mixer", EVERY_FORM + ONE_FORM)
def test_mixers_on_a_rank_2_attention_bias(rank2_decoder, mixer):
    assert [a["mask"] for a in graphopt.summary.attention_layers(rank2_decoder)] == ["additive", "additive"]
    result = graphopt.optimize(rank2_decoder, passes=["eliminate-dead-code"], mixer=mixer, layers="all",
                               dims=models.MATRIX_DIMS, calib_steps=3)
    assert result.report.fidelity["layers_swapped"] == [0, 1]
    out = graphopt.verify.run(result.model, graphopt.feeds.make_inputs(result.model, dims=models.MATRIX_DIMS, seed=2))
    assert all(np.isfinite(v).all() for v in out.values())
