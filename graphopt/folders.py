"""A local Hugging Face / sentence-transformers model folder as input (`graphopt.load(DIR)`,
`graphopt optimize DIR`): config.json + weights, read offline, exported through torch's
exporter with dynamic batch (and sequence) axes.

The task comes from `task` or the config's architecture (TASKS); each task is one wrapper that
fixes the inputs and the one output the exported model has:
    feature-extraction       input_ids, attention_mask -> last_hidden_state
    sentence-embedding       the same, mean-pooled over real tokens (and L2-normalized when the
                             folder's modules.json says so): a sentence-transformers folder
    sequence-classification  input_ids, attention_mask -> logits
    token-classification     input_ids, attention_mask -> logits
    causal-lm                input_ids, attention_mask -> logits (no KV cache)
    causal-lm-with-past      input_ids [batch, seq], attention_mask [batch, past + seq],
                             past_key_values.{i}.key/.value [batch, kv_heads, past, head_dim]
                             -> logits, present.{i}.key/.value (past + seq long); a past of
                             length 0 is the first step
    seq2seq-encoder          an encoder-decoder folder's encoder: input_ids, attention_mask ->
                             last_hidden_state (the default for is_encoder_decoder configs)
    image-classification     pixel_values -> logits
`preprocessor(DIR)` is the folder's tokenizer or image processor, which the CLI saves beside
the output. Not built: the seq2seq decoder.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from graphopt.errors import InputError

TASKS = ("feature-extraction", "sentence-embedding", "sequence-classification", "token-classification", "causal-lm",
         "causal-lm-with-past", "seq2seq-encoder", "image-classification")
SUFFIXES = (("ForSequenceClassification", "sequence-classification"), ("ForTokenClassification", "token-classification"),
            ("ForImageClassification", "image-classification"), ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"))
OUTPUTS = {"feature-extraction": "last_hidden_state", "sentence-embedding": "sentence_embedding",
           "seq2seq-encoder": "last_hidden_state"}
TEXT_DYNAMIC = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
EXAMPLE_PAST = 3  # cached tokens in the with-past export's example (the exported past is dynamic)
EXAMPLE_TEXT = ["graphopt exports this folder.", "A second, somewhat longer example sentence for the export."]


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path / 'config.json'} is not readable JSON ({exc})") from None


def task_of(path: Path, task: str | None = None) -> str:
    """The task asked for, or the one the folder's config names."""
    if task is not None:
        if task not in TASKS:
            raise InputError(f"unknown task '{task}'", hint=f"choose from {', '.join(TASKS)}")
        return task
    if (path / "modules.json").is_file() and "Pooling" in (path / "modules.json").read_text():
        return "sentence-embedding"
    config = _config(path)
    if config.get("is_encoder_decoder"):
        return "seq2seq-encoder"
    for arch in config.get("architectures") or []:
        for suffix, name in SUFFIXES:
            if arch.endswith(suffix):
                return name
    return "feature-extraction"


def preprocessor(path: Path) -> Any:
    """The folder's tokenizer, else its image processor, else None."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()  # e.g. the note that a PIL processor stands in for torchvision's
    for make in (AutoTokenizer, AutoImageProcessor):
        try:
            return make.from_pretrained(str(path), local_files_only=True)
        except Exception:  # the folder has no such files
            continue
    return None


def is_tokenizer(made: Any) -> bool:
    """Whether a preprocessor is a tokenizer (image processors have `pad` too)."""
    return made is not None and hasattr(made, "convert_tokens_to_ids")


def _weights(path: Path) -> None:
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise InputError(f"{path} has a config.json but no weights (model.safetensors or pytorch_model.bin)",
                         hint="save the model with save_pretrained, or pass the .onnx file")


def module_for(path: Path, task: str) -> Any:
    """The torch module of the task's wrapper over the folder's weights."""
    import transformers

    _weights(path)
    transformers.utils.logging.set_verbosity_error()  # the user sees graphopt's one line, not the loader's bars
    transformers.utils.logging.disable_progress_bar()
    auto = {"feature-extraction": "AutoModel", "sentence-embedding": "AutoModel",
            "sequence-classification": "AutoModelForSequenceClassification",
            "token-classification": "AutoModelForTokenClassification", "causal-lm": "AutoModelForCausalLM",
            "causal-lm-with-past": "AutoModelForCausalLM", "seq2seq-encoder": "AutoModelForSeq2SeqLM",
            "image-classification": "AutoModelForImageClassification"}[task]
    try:
        model = getattr(transformers, auto).from_pretrained(str(path), local_files_only=True).eval()
    except Exception as exc:
        raise InputError(f"transformers cannot load {path} as {task} ({str(exc).splitlines()[0]})",
                         hint="pass --task for the head the folder has") from None
    if task == "image-classification":
        return _Pixels(model)
    if task == "seq2seq-encoder":
        return _Text(model.get_encoder(), "feature-extraction", False)
    if task == "causal-lm-with-past":
        return _Cached(model)
    normalize = (path / "modules.json").is_file() and "Normalize" in (path / "modules.json").read_text()
    return _Text(model, task, normalize)


def load_folder(path: Path, task: str | None = None):
    """The folder exported to a graphopt Model (its one output named for the task)."""
    import torch

    from graphopt import importers

    task = task_of(path, task)
    module = module_for(path, task)
    config = _config(path)
    if task == "image-classification":
        size = config.get("image_size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        example = (torch.randn(2, config.get("num_channels", 3), *size),)
        dynamic = {"pixel_values": {0: "batch"}}
    else:
        tokenizer = preprocessor(path)
        if is_tokenizer(tokenizer) and getattr(tokenizer, "pad_token", None) is not None:
            encoded = tokenizer(EXAMPLE_TEXT, padding=True, return_tensors="pt")
            example = (encoded["input_ids"], encoded["attention_mask"])
        else:
            ids = torch.randint(0, config.get("vocab_size", 100), (2, 12), generator=torch.Generator().manual_seed(0))
            example = (ids, torch.ones_like(ids))
        dynamic = TEXT_DYNAMIC
        if task == "causal-lm-with-past":
            example, dynamic = _with_past(module, example)
    with warnings.catch_warnings():  # the exporter's notes on renamed axes are not the user's concern
        warnings.simplefilter("ignore")
        model = importers.load(module, example_inputs=example, dynamic_shapes=dynamic)
    outputs = model.ir.graph.outputs
    if len(outputs) == 1:
        outputs[0].name = OUTPUTS.get(task, "logits")
    if task == "causal-lm-with-past":
        names = cache_names(module.layers)
        for value, name in zip(model.ir.graph.inputs, ["input_ids", "attention_mask", *names], strict=True):
            value.name = name
        presents = [n.replace("past_key_values", "present") for n in names]
        for value, name in zip(outputs, ["logits", *presents], strict=True):
            value.name = name
    model.ir.metadata_props["graphopt.task"] = task
    return model


class _Text:
    """Built lazily (torch imported only when a folder is loaded)."""

    def __new__(cls, model, task: str, normalize: bool):
        import torch

        class Text(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask):
                out = self.model(input_ids=input_ids, attention_mask=attention_mask)
                if task in ("feature-extraction", "sentence-embedding"):
                    hidden = out.last_hidden_state
                    if task == "feature-extraction":
                        return hidden
                    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                    return torch.nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled
                return out.logits

        return Text().eval()


def cache_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{part}" for i in range(layers) for part in ("key", "value")]


def _with_past(module, example):
    """Example inputs with a past of EXAMPLE_PAST tokens, and dims: batch, seq, past (the mask's
    length is left to the exporter, which sees it is past + seq)."""
    import torch
    from torch.export import Dim

    ids, mask = example
    config = module.model.config  # GPT-2's n_head / n_embd answer to these names too
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    g = torch.Generator().manual_seed(0)
    shape = (ids.shape[0], kv_heads, EXAMPLE_PAST, head_dim)
    pasts = tuple(torch.randn(shape, generator=g) for _ in range(2 * module.layers))
    mask = torch.cat([torch.ones(ids.shape[0], EXAMPLE_PAST, dtype=mask.dtype), mask], dim=1)
    batch, seq, past = Dim("batch"), Dim("seq"), Dim("past")
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: Dim.AUTO}, tuple({0: batch, 2: past} for _ in pasts))
    return (ids, mask, *pasts), dynamic


class _Cached:
    """A decoder step: the cache in as inputs, the updated cache out."""

    def __new__(cls, model):
        import torch

        layers = model.config.num_hidden_layers

        class Cached(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model, self.layers = model, layers

            def forward(self, input_ids, attention_mask, *past):
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
                for i in range(self.layers):
                    cache.update(past[2 * i], past[2 * i + 1], i)
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
                return (out.logits, *[t for layer in out.past_key_values.layers[: self.layers] for t in (layer.keys, layer.values)])

        return Cached().eval()


class _Pixels:
    def __new__(cls, model):
        import torch

        class Pixels(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, pixel_values):
                return self.model(pixel_values=pixel_values).logits

        return Pixels().eval()
