"""torch import: transformers models (random weights) and MiniLM-L6 (real weights)
through graphopt.load(module, example_inputs) with dynamic batch and sequence;
the ONNX model must match torch at other batch sizes and lengths too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphopt
from graphopt import verify
from models import DYNAMIC, SENTENCES, minilm, tiny_bert, tiny_gpt2, token_inputs

pytestmark = pytest.mark.slow


def _check_against_torch(module, model, vocab, shapes):
    for batch, seq in shapes:
        ids, mask = token_inputs(vocab, batch, seq, seed=batch * 100 + seq)
        with torch.no_grad():
            expected = module(ids, mask).numpy()
        got = next(iter(verify.run(model, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}).values()))
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)  # torch vs ORT kernels: different summation orders


@pytest.mark.parametrize("builder", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_transformers_dynamic(builder):
    module, config = builder()
    model = graphopt.load(module, example_inputs=token_inputs(config.vocab_size), dynamic_shapes=DYNAMIC)
    dims = [[d if isinstance(d, int) else d.value for d in v.shape] for v in model.graph.inputs]
    assert dims == [["batch", "seq"], ["batch", "seq"]]
    _check_against_torch(module, model, config.vocab_size, [(2, 16), (1, 7), (3, 33)])
    optimized = graphopt.optimize(model, dims={"batch": 2, "seq": 16})
    assert optimized.report.validation.passed


def test_minilm_real_weights(tmp):
    module, tokenizer = minilm()
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    example = (enc["input_ids"], enc["attention_mask"])
    model = graphopt.load(module, example_inputs=example, dynamic_shapes=DYNAMIC)
    feeds = {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()}
    with torch.no_grad():
        expected = module(*example).numpy()
    got = next(iter(verify.run(model, feeds).values()))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # Real embeddings are meaningful: paraphrase-free sentences are far from identical.
    assert float(got[0] @ got[3]) < 0.9
    path = graphopt.save(model, tmp / "minilm.onnx")
    assert graphopt.validate(model, path, feeds).passed


def test_torch_module_needs_examples():
    module, _ = tiny_bert()
    with pytest.raises(graphopt.InputError, match="example_inputs"):
        graphopt.load(module)
