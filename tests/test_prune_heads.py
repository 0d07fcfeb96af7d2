"""Issue 29 item 2: attention heads and whole blocks as pruning forms (`prune="heads"`,
`"blocks"`, `"all"`), on what torch's exporter writes for transformers models.

Each edit is checked against a torch reference of the pruned model: the transformers module
with its Q/K/V and output Linear layers cut to the kept heads, or with a block's output
replaced by the constant the refit chose. The OBS order over groups of columns takes a head
the others can stand in for first; the step honours the bound; refusals name the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphopt
from graphopt import verify
from graphopt.errors import InputError
from graphopt.ir import common_passes
from graphopt.passes.prune import neurons
from graphopt.passes.prune.heads import find_heads
from graphopt.passes.prune.step import find_sites, linear_flops
from graphopt.shapes import infer_shapes
import models
from graphopt import presets
from graphopt.passes._weights import const_array

HEADS, SIZE = 4, 8  # the tiny BERT: hidden 32, 4 heads


def _export(tmp_path, passes=None):
    module, args, names, dynamic = models.transformer("bert", "eager")
    path = models.export(module, args, names, dynamic, tmp_path / "bert.onnx", "dynamo")
    exact = graphopt.optimize(path, **({"passes": passes} if passes else {})).model
    infer_shapes(exact.ir)
    return module, args, exact


def _feeds(args):
    return {"input_ids": args[0].numpy(), "attention_mask": args[1].numpy()}


def _cut(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A Linear keeping output rows (dim 0) or input columns (dim 1) `index`."""
    w = linear.weight.index_select(dim, index)
    cut = torch.nn.Linear(w.shape[1], w.shape[0])
    cut.weight.data, cut.bias.data = w.clone(), (linear.bias[index] if dim == 0 else linear.bias).clone()
    return cut


def _prune_torch(module, layer: int, keep: list[int]) -> None:
    attention = module.model.encoder.layer[layer].attention
    index = torch.tensor([h * SIZE + d for h in keep for d in range(SIZE)])
    for name in ("query", "key", "value"):
        setattr(attention.self, name, _cut(getattr(attention.self, name), index, 0))
    attention.self.num_attention_heads, attention.self.all_head_size = len(keep), len(keep) * SIZE
    attention.output.dense = _cut(attention.output.dense, index, 1)


def _unrefitted(site, keep):
    keep = np.array(keep, np.int64)
    w2 = site.w2[neurons.columns(keep, site.group)]
    return neurons.Refit(keep, w2, np.zeros(site.w2.shape[1], np.float32), 0.0, 0.0, None)


@pytest.mark.parametrize("merged", [True, False], ids=["merged-qkv", "separate-qkv"])
def test_pruned_heads_equal_a_torch_reference_with_those_heads_cut(tmp_path, merged):
    passes = None if merged else [p for p in presets.resolve(presets.DEFAULT, None)
                                  if p != "merge-parallel-linears"]
    module, args, exact = _export(tmp_path, passes)
    sites, refused = find_heads(exact.ir.graph)
    assert refused == {} and len(sites) == 2 and [s.heads for s in sites] == [HEADS, HEADS]
    assert all((s.projections[0].split is not None) == merged for s in sites)
    keeps = {0: [0, 2], 1: [1, 2, 3]}
    for layer, keep in keeps.items():
        neurons.apply(exact.ir.graph, sites[layer], _unrefitted(sites[layer], keep))
        _prune_torch(module, layer, keep)
    common_passes.RemoveUnusedNodesPass()(exact.ir)
    assert verify.load_problem(exact) is None
    attention = [n for n in exact.ir.graph if n.domain == "graphopt" and "Attention" in n.op_type]
    assert [n.attributes.get_int("q_num_heads") for n in attention] == [2, 3]
    with torch.no_grad():
        want = module(*args).numpy()
    got = verify.run(exact, _feeds(args))
    np.testing.assert_allclose(next(iter(got.values())), want, rtol=1e-5, atol=1e-5)


def test_dropped_blocks_equal_a_torch_reference_with_a_constant_output(tmp_path):
    module, args, exact = _export(tmp_path)
    sites, _ = find_sites(exact.ir.graph, ("ffn", "heads", "blocks"))
    assert [s.form for s in sites] == ["heads", "ffn", "heads", "ffn"]
    assert all(neurons.drop_blocker(s) is None for s in sites)
    rng = np.random.default_rng(0)
    shifts = {1: rng.standard_normal(32).astype(np.float32), 2: rng.standard_normal(32).astype(np.float32)}
    biases = {}
    for i, shift in shifts.items():
        found = neurons.output_bias(sites[i])
        biases[i] = const_array(found[0].inputs[found[1]])
        neurons.apply(exact.ir.graph, sites[i], neurons.Refit(np.zeros(0, np.int64), np.zeros((0, 32), np.float32), shift, 0, 0, None))
    common_passes.RemoveUnusedNodesPass()(exact.ir)

    class Constant(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = torch.from_numpy(value)

        def forward(self, x):
            return self.value.expand(*x.shape[:-1], -1)

    module.model.encoder.layer[0].output.dense = Constant(biases[1] + shifts[1])  # layer 0's FFN dropped
    module.model.encoder.layer[1].attention.output.dense = Constant(biases[2] + shifts[2])  # layer 1's attention dropped
    with torch.no_grad():
        want = module(*args).numpy()
    got = next(iter(verify.run(exact, _feeds(args)).values()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    left = [n.op_type for n in exact.ir.graph if n.domain == "graphopt"]
    assert sum("Attention" in op for op in left) == 1  # the dropped attention and its projections are gone
    assert linear_flops(exact) == 2 * 32 * (3 * 32 + 32) + 2 * (32 * 64 + 64 * 32)  # layer 0's attention and layer 1's FFN left


def test_removal_order_over_heads_takes_a_duplicated_head_first():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2048, HEADS * SIZE))
    h[:, 3 * SIZE:] = h[:, :SIZE] @ rng.standard_normal((SIZE, SIZE))  # head 3: a linear map of head 0
    w2 = rng.standard_normal((HEADS * SIZE, 16)).astype(np.float32)
    order, errors = neurons.removal_order(h, w2, HEADS - 1, group=SIZE)
    assert order[0] in (0, 3) and errors[0] < 0.01 * (errors[1] - errors[0])  # near free, against a real head
    assert list(errors) == sorted(errors)  # squared error only grows as heads go
    kept = np.setdiff1d(np.arange(HEADS), order[:1])
    fit = neurons.refit(h[:1024], h[1024:], w2, kept, group=SIZE)
    assert fit.held_error < 1e-4 < fit.held_error_unrefitted


def _calibration(n=64, seed=0):
    ids, mask = models.token_inputs(128, n, 16, seed=seed)
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


@pytest.mark.parametrize("form", ["heads", "blocks", "all"])
def test_the_step_prunes_every_form_within_the_bound(tmp_path, form):
    module, args, exact = _export(tmp_path)
    calib = [_calibration(64, 0), _calibration(64, 1)]
    result = graphopt.optimize(exact, passes=["eliminate-dead-code"], prune=form, fidelity=0.97, calib=calib)
    step = result.report.steps[-1]
    assert step.name == "prune" and step.status == "applied" and step.check["passed"]
    report = step.fidelity
    assert fidelity_ok(report, 0.97)
    assert {e["form"] for e in report["per_layer"]} == ({"heads"} if form == "heads" else {"heads", "ffn"})
    removed = sum(step.rewrites.values())
    assert removed > 0 and linear_flops(result.model) < linear_flops(exact)
    assert step.rewrites == {k: v for k, v in neurons_removed(report).items() if v}
    assert verify.load_problem(result.model) is None
    fresh = _feeds(models.token_inputs(128, 8, 16, seed=7))
    assert verify.min_cosine(verify.run(exact, fresh), verify.run(result.model, fresh)) > 0.8


def fidelity_ok(report, bound) -> bool:
    return all(e["mean_cosine"] >= bound for e in report["end_to_end"].values())


def neurons_removed(report) -> dict[str, int]:
    counts = {"PruneFfnNeurons": 0, "PruneAttentionHeads": 0, "DropBlocks": 0}
    for e in report["per_layer"]:
        if e["kept"] == 0:
            counts["DropBlocks"] += 1
        else:
            counts["PruneFfnNeurons" if e["form"] == "ffn" else "PruneAttentionHeads"] += e["width"] - e["kept"]
    return counts


def test_refusals_name_the_reason(tmp_path):
    _, gqa = models.optimized_export("llama", "eager", "dynamo")
    work = gqa.model.clone()
    infer_shapes(work.ir)
    sites, refused = find_heads(work.ir.graph)
    assert sites == [] and all("grouped-query attention (4 query heads, 2 K/V heads)" in why for why in refused.values())
    with pytest.raises(InputError, match="--prune heads found nothing to prune.*grouped-query"):
        graphopt.optimize(gqa.model, passes=["eliminate-dead-code"], prune="heads", calib=[_calibration(), _calibration(seed=1)])
    _, legacy = models.optimized_export("bert", "eager", "legacy")
    work = legacy.model.clone()
    infer_shapes(work.ir)
    _, refused = find_heads(work.ir.graph)
    assert refused and all("bias" in why and "computed at run time" in why for why in refused.values())
    with pytest.raises(InputError, match="unknown pruning form 'rows'"):
        graphopt.optimize(gqa.model, prune="rows")
