"""Pipeline: registry, presets, per-pass checks, rollback, report schema."""

from __future__ import annotations

import json

import numpy as np
import onnx.parser
import pytest

import graphopt
from graphopt import presets, registry
from graphopt.ir import ir
from graphopt.rewrite import Pass, PassKind

MODEL = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[4, 8] x) => (float[4, 8] y) <float[8, 8] w> {
    h = MatMul(x, w)
    i = Identity(h)
    y = Relu(i)
}
"""


def model():
    proto = onnx.parser.parse_model(MODEL)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w"))
    return graphopt.load(proto)


class ScaleWeights(Pass):
    """Test pass: multiplies every initializer by 1.001 (wrong for an exact pass)."""

    name = "test-scale-weights"
    kind = PassKind.EXACT

    def run(self, m: ir.Model) -> dict[str, int]:
        for v in m.graph.initializers.values():
            v.const_value = ir.tensor(v.const_value.numpy() * np.float32(1.001), name=v.name)
        return {"ScaleWeights": len(m.graph.initializers)}


class Crash(Pass):
    """Test pass: removes a node, then raises."""

    name = "test-crash"
    kind = PassKind.EXACT

    def run(self, m: ir.Model) -> dict[str, int]:
        m.graph.remove(list(m.graph)[-1], safe=False)
        raise RuntimeError("bug in pass")


@pytest.fixture
def test_passes():
    for p in (ScaleWeights, Crash):
        registry.register(p)
    yield
    for p in (ScaleWeights, Crash):
        registry.unregister(p.name)


def test_registry_and_presets():
    names = {p.name for p in registry.available()}
    assert {"fold-constants", "eliminate-identity", "cse", "eliminate-dead-code"} <= names
    assert all(str(registry.get(n).kind) in ("exact", "approximate", "lowering") for n in names)
    assert presets.resolve("exact") == list(presets.PRESETS["exact"])
    assert presets.resolve("exact", ["cse"]) == ["cse"]
    with pytest.raises(graphopt.InputError, match="unknown preset 'nope'"):
        presets.resolve("nope")
    with pytest.raises(graphopt.InputError, match="unknown pass 'nope'.*known passes"):
        graphopt.optimize(model(), passes=["nope"])
    with pytest.raises(ValueError, match="kebab-case"):
        registry.register(type("Bad", (ScaleWeights,), {"name": "Bad_Name"}))


def test_diverging_exact_pass_is_rolled_back(test_passes):
    m = model()
    result = graphopt.optimize(m, passes=["test-scale-weights", "eliminate-identity"])
    first, second = result.report.passes
    assert first.status == "rolled-back" and not first.check["passed"] and "diverged" in first.note
    assert second.status == "applied" and second.rewrites["RemoveIdentity"] == 1
    assert result.report.validation.passed  # the final model is the original function
    np.testing.assert_array_equal(result.model.graph.initializers["w"].const_value.numpy(), m.graph.initializers["w"].const_value.numpy())


def test_approximate_pass_is_kept_and_measured(test_passes, monkeypatch):
    monkeypatch.setattr(ScaleWeights, "kind", PassKind.APPROXIMATE)
    result = graphopt.optimize(model(), passes=["test-scale-weights"])
    (record,) = result.report.passes
    assert record.status == "applied" and not record.check["passed"] and record.check["min_cosine"] > 0.999
    assert not result.passed  # the final validation reports the change


def test_crashing_pass_is_rolled_back(test_passes):
    result = graphopt.optimize(model(), passes=["test-crash", "eliminate-identity"])
    crashed = result.report.passes[0]
    assert crashed.status == "failed" and "bug in pass" in crashed.note
    assert result.report.validation.passed


def test_input_model_is_not_mutated():
    m = model()
    before = [n.op_type for n in m.graph]
    graphopt.optimize(m)
    assert [n.op_type for n in m.graph] == before


def test_report_schema(tmp):
    result = graphopt.optimize(model())
    path = result.report.write_json(tmp / "r.json")
    data = json.loads(path.read_text())
    assert set(data) >= {"passes", "validation", "model"}
    assert set(data["passes"][0]) >= {"name", "kind", "rewrites", "seconds", "check"}
    assert set(data["model"]) == {"before", "after"}
    assert data["model"]["after"]["num_nodes"] == 2  # Identity removed
    assert result.report.rewrites() == {"FoldConstants": 1}  # the folder forwards Identity itself
    assert data["validation"]["passed"] is True


def test_no_validate_records_no_checks():
    result = graphopt.optimize(model(), validate=False)
    assert result.report.validation is None and all(p.check is None for p in result.report.passes)
    assert any("validation was off" in n for n in result.report.notes)


def test_explain_reports_each_near_miss_once():
    """One line per rule and node, however many commuted variants of the rule tried it."""
    text = '<ir_version: 10, opset_import: ["" : 21]>\ng (float[2, 3] x) => (float[3, 2] y) { r = Relu(x)\n y = Transpose<perm = [1, 0]>(r) }'
    lines = registry.get("eliminate-identity").near_misses(graphopt.load(onnx.parser.parse_model(text)).ir)
    assert lines == ["RemoveIdentityTranspose: a Transpose node: condition failed: perm is not the identity permutation at 'r'"]


def test_plan_is_data_one_step_per_request():
    """optimize builds a plan: exact passes by name, then the approximate step a request names,
    then the lowering for the target; unknown requests fail before any work."""
    from graphopt import plan

    built = plan.build(["cse", "eliminate-dead-code"], approximate={"mixer": "linear:elu"}, target="ort-cpu")
    assert built.names == ["cse", "eliminate-dead-code", "swap-mixers", "lower-ort-cpu"]
    assert [str(s.kind) for s in built.steps] == ["exact", "exact", "approximate", "lowering"]
    assert plan.build(["cse"], approximate={"mixer": None}).names == ["cse"]
    with pytest.raises(graphopt.InputError, match="unknown target 'nope'"):
        plan.build([], target="nope")
    with pytest.raises(graphopt.InputError, match="unknown mixer"):
        plan.build([], approximate={"mixer": "linear:nope"})


def test_report_schema_v3_keeps_the_v2_and_v1_views(tmp):
    """One record shape for every step (with schema 3's "details"); "passes", "fidelity" and "lowering" stay readable."""
    result = graphopt.optimize(model())
    data = json.loads(result.report.write_json(tmp / "r.json").read_text())
    assert data["schema_version"] == 3 and data["passes"] == data["steps"]
    assert set(data["steps"][0]) == {"name", "kind", "rewrites", "seconds", "status", "check", "note", "near_misses",
                                     "fidelity", "measurements", "details"}
    assert data["fidelity"] is None and data["lowering"] is None and data["steps"][0]["details"] is None


def test_a_step_adds_columns_not_renderer_branches(tmp):
    """A step the renderers have never seen declares its details; both renderers draw them."""
    from rich.console import Console

    from graphopt import details, report_html
    from graphopt.details import Details, Table
    from graphopt.steps import StepRecord

    result = graphopt.optimize(model())
    made = Details([Table("widgets per layer", details.columns(("index", "layer"), ("widgets", "widgets", ".1f"),
                                                              ("why", "why")),
                          [{"index": 0, "widgets": 2.5, "why": "kept"}, {"index": 1, "widgets": 7.0, "why": "chosen"}],
                          chosen=1, chart="widgets", unit="widgets")],
                   end_to_end={"y": {"mean_cosine": 0.999, "min_cosine": 0.99, "max_abs_error": 0.01}}, bound=0.98,
                   lines=["a line of its own"], warnings=["a warning"])
    result.report.steps.append(StepRecord("count-widgets", "approximate", {}, 0.0, "applied", details=made))
    console = Console(record=True, width=200)
    console.print(result.report.tables())
    text = console.export_text()
    assert "widgets per layer" in text and "7.0" in text and "a line of its own" in text and "WARNING: a warning" in text
    data = json.loads(result.report.write_json(tmp / "r.json").read_text())
    assert Details.from_dict(data["steps"][-1]["details"]) == made
    page = report_html.render(data)
    assert "<h2>Fidelity</h2>" in page and "widgets per layer" in page and "<b>1</b>" in page and "a warning" in page


def test_a_step_that_changed_nothing_is_not_run_again():
    result = graphopt.optimize(model(), passes=["cse", "eliminate-identity"])
    unchanged, identity = result.report.passes
    assert unchanged.status == "no-op" and unchanged.check == {"skipped": "the pass changed nothing"}
    assert identity.status == "applied" and identity.check["passed"]
    assert result.report.validation.passed


@pytest.mark.parametrize("every", [0, 2])
def test_checks_in_groups_roll_a_diverging_group_back_whole(test_passes, every):
    m = model()
    result = graphopt.optimize(m, passes=["eliminate-identity", "test-scale-weights", "cse"], check_every=every)
    identity, scale, unchanged = result.report.passes
    for record in (identity, scale):
        assert record.status == "rolled-back" and record.check["group"] == ["eliminate-identity", "test-scale-weights"]
        assert "checked as one group (eliminate-identity, test-scale-weights)" in record.note
    assert unchanged.check == {"skipped": "the pass changed nothing"}
    assert "Identity" in {n.op_type for n in result.model.graph}  # the whole group was undone
    assert result.report.validation.passed


def test_checks_in_groups_keep_a_good_group():
    result = graphopt.optimize(model(), passes=["eliminate-identity", "cse", "fold-constants"], check_every=0)
    applied = [p for p in result.report.passes if p.status == "applied"]
    assert applied and all(p.check["passed"] and p.check["group"] == [a.name for a in applied] for p in applied)
    assert result.report.validation.passed and "Identity" not in {n.op_type for n in result.model.graph}
    with pytest.raises(graphopt.InputError, match="check_every"):
        graphopt.optimize(model(), check_every=-1)


def test_a_result_runs_where_it_was_made_for_without_naming_the_runtime(tmp):
    """result.session() and graphopt.session(path): run(feeds) in the runtime the metadata names."""
    from graphopt.model import PRECISION_KEY, RUNTIME_KEY
    from graphopt import verify

    feeds = {"x": np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)}
    result = graphopt.optimize(model())
    want = verify.run(model(), feeds)["y"]
    np.testing.assert_allclose(result.session().run(feeds)["y"], want, rtol=1e-5, atol=1e-6)
    path = graphopt.save(result.model, tmp / "m.onnx")
    np.testing.assert_allclose(graphopt.session(path).run(feeds)["y"], want, rtol=1e-5, atol=1e-6)
    pytest.importorskip("openvino")
    result.model.ir.metadata_props.update({RUNTIME_KEY: "openvino", PRECISION_KEY: "fp32"})  # --target cpu's, when OpenVINO won
    session = result.session()
    assert type(session).__module__.startswith("graphopt.backends.openvino")
    np.testing.assert_allclose(session.run(feeds)["y"], want, rtol=1e-5, atol=1e-5)
    path = graphopt.save(result.model, tmp / "ov.onnx")
    assert type(graphopt.session(path)).__module__.startswith("graphopt.backends.openvino")
