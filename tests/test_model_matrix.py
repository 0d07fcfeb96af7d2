"""The exact preset on what exporters really emit: 8 transformers architectures x
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
from openvino_check import assert_matches_in_openvino

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

GOLDEN = json.loads((Path(__file__).parent / "golden_exact.json").read_text())
CLEANUP = {"FoldConstants", "RemoveSameTypeCast", "RemoveIdentity", "RemoveIdentityTranspose", "RemoveUnitFactor",
           "MergeCommonSubexpressions", "RemoveDeadNodes", "RemoveDeadInitializers", "RemoveDeadFunctions"}


@pytest.mark.parametrize("key", sorted(k for k in GOLDEN if k != "minilm-real"))
def test_exact_preset_on_export(key, tmp):
    arch, attn, exporter = key.split("-")
    path, result = models.optimized_export(arch, attn, exporter)  # shared with the robustness matrix
    assert result.report.validation.passed, result.report.validation.to_dict()
    assert not [p.name for p in result.report.passes if p.status in ("rolled-back", "failed")]
    assert {k: v for k, v in result.report.rewrites().items() if k not in CLEANUP} == GOLDEN[key]
    # Attention (issue 4): detected on the raw export, one canonical op per layer after the preset.
    kv = 2 if arch in ("llama", "qwen2", "mistral") else 4
    decoder = arch in ("gpt2", "llama", "qwen2", "mistral")
    raw = graphopt.summary.attention_layers(graphopt.load(path))
    assert [(a["canonical"], a["heads"], a["kv_heads"], a["head_size"], a["rope"], a["scaled"]) for a in raw] == \
        [(False, 4, kv, 8, kv == 2, attn == "eager")] * 2
    canonical = graphopt.summary.attention_layers(result.model)
    assert [(a["canonical"], a["heads"], a["kv_heads"], a["head_size"], a["rope"], a["scaled"], a["causal"]) for a in canonical] == \
        [(True, 4, kv, 8, kv == 2, False, decoder)] * 2
    assert all(a["mask"] == ("none" if arch == "vit" and exporter == "legacy" else "additive") for a in canonical)
    # Portable output (issue 12): the same model, graphopt functions inlined, runs in OpenVINO.
    assert_matches_in_openvino(result.model, graphopt.feeds.make_inputs(result.model, dims={"batch": 2, "seq": 16}))


def test_exact_preset_on_minilm_real_weights():
    module, tokenizer = models.minilm()
    enc = tokenizer(models.SENTENCES, padding=True, return_tensors="pt")
    model = graphopt.load(module, example_inputs=(enc["input_ids"], enc["attention_mask"]), dynamic_shapes=models.DYNAMIC)
    feeds = {k: enc[k].numpy() for k in ("input_ids", "attention_mask")}
    result = graphopt.optimize(model, inputs=feeds)
    assert result.report.validation.passed, result.report.validation.to_dict()
    assert {k: v for k, v in result.report.rewrites().items() if k not in CLEANUP} == GOLDEN["minilm-real"]
    assert [(a["heads"], a["kv_heads"], a["head_size"]) for a in graphopt.summary.attention_layers(model)] == [(12, 12, 32)] * 6
    assert [(a["canonical"], a["heads"], a["causal"]) for a in graphopt.summary.attention_layers(result.model)] == [(True, 12, False)] * 6
    assert_matches_in_openvino(result.model, feeds)
