"""The exact preset on what exporters really emit: 7 transformers architectures x
{dynamo, legacy} exporters x {eager, sdpa} attention (random weights, tiny sizes),
plus MiniLM-L6 with real weights. Golden {rule: count} per model, and validation.

Cleanup counts (folded constants, CSE, dead code) depend on exporter internals and
are not pinned; the structural rewrites are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import graphopt
import models

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

GOLDEN = json.loads((Path(__file__).parent / "golden_exact.json").read_text())
CLEANUP = {"FoldConstants", "RemoveSameTypeCast", "RemoveIdentity", "RemoveIdentityTranspose",
           "MergeCommonSubexpressions", "RemoveDeadNodes", "RemoveDeadInitializers", "RemoveDeadFunctions"}


@pytest.mark.parametrize("key", sorted(k for k in GOLDEN if k != "minilm-real"))
def test_exact_preset_on_export(key, tmp):
    arch, attn, exporter = key.split("-")
    module, args, names, dynamic = models.transformer(arch, attn)
    path = models.export(module, args, names, dynamic, tmp / "m.onnx", exporter)
    result = graphopt.optimize(path, dims={"batch": 2, "seq": 16})
    assert result.report.validation.passed, result.report.validation.to_dict()
    assert not [p.name for p in result.report.passes if p.status in ("rolled-back", "failed")]
    assert {k: v for k, v in result.report.rewrites().items() if k not in CLEANUP} == GOLDEN[key]
    # Attention detection (issue 4, first part), before and after the preset: one site per layer.
    kv = 2 if arch in ("llama", "qwen2") else 4
    for model, scaled in ((graphopt.load(path), attn == "eager"), (result.model, False)):
        layers = graphopt.summary.attention_layers(model)
        assert [(a["heads"], a["kv_heads"], a["head_size"], a["rope"], a["scaled"]) for a in layers] == \
            [(4, kv, 8, arch in ("llama", "qwen2"), scaled)] * 2
        assert all(a["mask"] == ("none" if arch == "vit" and exporter == "legacy" else "additive") for a in layers)


def test_exact_preset_on_minilm_real_weights():
    module, tokenizer = models.minilm()
    enc = tokenizer(models.SENTENCES, padding=True, return_tensors="pt")
    model = graphopt.load(module, example_inputs=(enc["input_ids"], enc["attention_mask"]), dynamic_shapes=models.DYNAMIC)
    feeds = {k: enc[k].numpy() for k in ("input_ids", "attention_mask")}
    result = graphopt.optimize(model, inputs=feeds)
    assert result.report.validation.passed, result.report.validation.to_dict()
    assert {k: v for k, v in result.report.rewrites().items() if k not in CLEANUP} == GOLDEN["minilm-real"]
    assert [(a["heads"], a["kv_heads"], a["head_size"]) for a in graphopt.summary.attention_layers(model)] == [(12, 12, 32)] * 6
