"""Small real models the tests share: transformers models from configs (random
weights, seeded) and MiniLM-L6 with its real trained weights."""

from __future__ import annotations

import functools

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))  # the demo's model code is shared, not copied


class LastHidden(torch.nn.Module):
    """Wrap a transformers model so it returns one tensor (export-friendly)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def tiny_bert(attn: str = "eager"):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, attn_implementation=attn)
    return LastHidden(BertModel(config).eval()), config


def tiny_gpt2(attn: str = "eager"):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_implementation=attn)
    return LastHidden(GPT2Model(config).eval()), config


def minilm():
    """MiniLM-L6 (all-MiniLM-L6-v2) with its real weights: the demo's sentence embedder."""
    from minilm_demo import load_minilm

    return load_minilm()


def token_inputs(vocab: int, batch: int = 2, seq: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[-1, seq // 2:] = 0  # one padded row
    return ids, mask


DYNAMIC = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "graphopt rewrites neural network graphs and proves they still compute the same thing.",
    "A deployment engineer wants the smallest latency on a two-core CPU.",
    "Sentence embeddings capture meaning.",
]


# The model matrix: transformers architectures at tiny sizes (random weights, seeded).
ARCHS = {
    "bert": ("BertModel", "BertConfig", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)),
    "distilbert": ("DistilBertModel", "DistilBertConfig", dict(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)),
    "roberta": ("RobertaModel", "RobertaConfig", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=70)),
    "gpt2": ("GPT2Model", "GPT2Config", dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama": ("LlamaModel", "LlamaConfig", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)),
    "mistral": ("MistralModel", "MistralConfig", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)),
    "qwen2": ("Qwen2Model", "Qwen2Config", dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)),
    "vit": ("ViTModel", "ViTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8)),
}


class PixelLastHidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state


def transformer(arch: str, attn: str):
    """(module, example args, input names, dynamic dims by input name)."""
    import transformers

    model_cls, config_cls, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs, attn_implementation=attn)).eval()
    if arch == "vit":
        return PixelLastHidden(model), (torch.randn(2, 3, 32, 32),), ["pixel_values"], {"pixel_values": {0: "batch"}}
    return LastHidden(model), token_inputs(128, 2, 16), ["input_ids", "attention_mask"], DYNAMIC


def export(module, args, names, dynamic, path, exporter: str):
    if exporter == "dynamo":
        torch.onnx.export(module, args, dynamo=True, dynamic_shapes=tuple(dynamic[n] for n in names)).save(str(path))
    else:
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=dynamic)
    return path


def exact_bert(directory, dims):
    """(path, the exact preset's output) for a legacy export of the tiny eager BERT (opset 17:
    graphopt Gelu and attention), optimized at `dims`."""
    import graphopt

    path = export(*transformer("bert", "eager"), Path(directory) / "bert.onnx", "legacy")
    return path, graphopt.optimize(path, dims=dims).model


def gpt2_with_trained_like_norms():
    """GPT-2 (tiny) whose LayerNorm parameters are perturbed away from 1 and 0, as trained ones are."""
    module, args, names, dynamic = transformer("gpt2", "eager")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return module, args, names, dynamic


class CachedDecoder(torch.nn.Module):
    """A transformers decoder fed past keys/values as plain tensors (2 per layer); with
    `presents`, it also returns the updated keys/values (what a decoding loop feeds back)."""

    def __init__(self, model, layers: int, presents: bool = False):
        super().__init__()
        self.model, self.layers, self.presents = model, layers, presents

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        if not self.presents:
            return out.last_hidden_state
        updated = [t for layer in out.past_key_values.layers[: self.layers] for t in (layer.keys, layer.values)]
        return (out.last_hidden_state, *updated)


def export_cached_decoder(arch: str, path, exporter: str, *, seq: int = 4, past: int = 6, presents: bool = False):
    """GPT-2 or Llama with a KV cache as inputs (and, with `presents`, the updated cache as
    outputs present_0..), exported; dims 'seq', 'past', 'total' (legacy: dynamic; dynamo:
    static, since torch.export cannot relate total = past + seq here)."""
    import transformers

    model_cls, config_cls, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs, attn_implementation="eager")).eval()
    layers = kwargs.get("num_hidden_layers", kwargs.get("n_layer"))
    kv_heads = kwargs.get("num_key_value_heads", kwargs.get("n_head", 4))
    g = torch.Generator().manual_seed(0)
    pasts = [torch.randn(2, kv_heads, past, 8, generator=g) for _ in range(2 * layers)]
    ids = torch.randint(0, 128, (2, seq), generator=g)
    mask = torch.ones(2, past + seq, dtype=torch.int64)
    args, module = (ids, mask, *pasts), CachedDecoder(model, layers, presents)
    names = ["input_ids", "attention_mask", *(f"past_{i}" for i in range(2 * layers))]
    outputs = ["last_hidden_state", *(f"present_{i}" for i in range(2 * layers) if presents)]
    if exporter == "dynamo":
        torch.onnx.export(module, args, dynamo=True).save(str(path))
    else:
        dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                   **{n: {0: "batch", 2: "past"} for n in names[2:]}, **{n: {0: "batch", 2: "total"} for n in outputs[1:]}}
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names,
                          output_names=outputs, dynamic_axes=dynamic)
    return path


class IdsOnly(torch.nn.Module):
    """A text model called with input_ids alone: no attention-mask input in the export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).last_hidden_state


MATRIX_DIMS = {"batch": 2, "seq": 16}
CACHED_DIMS = {"batch": 2, "seq": 4, "past": 6, "total": 10}
_EXPORTS: list[str] = []


def form_dims(variant: str) -> dict[str, int]:
    return CACHED_DIMS if variant == "kv" else MATRIX_DIMS


@functools.lru_cache(maxsize=None)
def optimized_export(arch: str, attn: str, exporter: str, variant: str = "mask"):
    """(path, graphopt.optimize result with the exact preset) of one export form, made once per
    test session (the model matrix and the robustness matrix share them). `variant`: "mask"
    (input_ids and attention_mask), "nomask" (input_ids only), "kv" (a KV cache; decoders, eager)."""
    import tempfile

    import graphopt

    if not _EXPORTS:
        _EXPORTS.append(tempfile.mkdtemp(prefix="graphopt-exports-"))
    path = Path(_EXPORTS[0]) / f"{arch}-{attn}-{exporter}-{variant}.onnx"
    if variant == "kv":
        export_cached_decoder(arch, path, exporter)
    elif variant == "nomask":
        wrapped, args, _, _ = transformer(arch, attn)
        export(IdsOnly(wrapped.model), (args[0],), ["input_ids"], {"input_ids": DYNAMIC["input_ids"]}, path, exporter)
    else:
        export(*transformer(arch, attn), path, exporter)
    return path, graphopt.optimize(path, dims=form_dims(variant))
