"""Inputs of every type (issue 14, item 3): strings, sequences and optional inputs are generated,
and a model whose inputs cannot be generated stops (issue 27) unless unchecked output is allowed,
then is optimized with a note saying what was not checked. The matrix: every ONNX backend node case with such an input that onnxruntime runs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import graphopt
import node_suite
from graphopt import feeds

pytestmark = pytest.mark.filterwarnings("ignore")


def _model(inputs, nodes, outputs):
    return graphopt.load(oh.make_model(oh.make_graph(nodes, "g", inputs, outputs), opset_imports=[oh.make_opsetid("", 18)]))


def test_strings_sequences_and_optionals_are_generated():
    model = _model(
        [oh.make_tensor_value_info("s", 8, ["batch", 4]),
         oh.make_value_info("q", oh.make_sequence_type_proto(oh.make_tensor_type_proto(1, [2, 3]))),
         oh.make_value_info("o", oh.make_optional_type_proto(oh.make_tensor_type_proto(7, [5])))],
        [oh.make_node("Identity", ["s"], ["s2"]), oh.make_node("SequenceLength", ["q"], ["n"]),
         oh.make_node("OptionalHasElement", ["o"], ["h"])],
        [oh.make_tensor_value_info("s2", 8, ["batch", 4]), oh.make_tensor_value_info("n", 7, []),
         oh.make_tensor_value_info("h", 9, [])])
    made = feeds.make_inputs(model, dims={"batch": 2}, seed=1)
    assert made["s"].shape == (2, 4) and made["s"].dtype == object and all(w.isalpha() for w in made["s"].ravel())
    assert len(made["q"]) == feeds.SEQUENCE_LENGTH and all(t.shape == (2, 3) and t.dtype == np.float32 for t in made["q"])
    assert made["o"].shape == (5,) and made["o"].dtype == np.int64
    assert (feeds.make_inputs(model, dims={"batch": 2}, seed=1)["s"] == made["s"]).all()  # seeded
    out = graphopt.verify.run(model, made)
    assert (out["s2"] == made["s"]).all() and int(out["n"]) == feeds.SEQUENCE_LENGTH and bool(out["h"])
    result = graphopt.optimize(model, dims={"batch": 2})
    assert result.report.validation is not None and result.report.validation.passed


def test_an_input_that_cannot_be_generated_stops_unless_unchecked_is_allowed():
    """Issue 27: checks are never switched off without asking; with allow_unchecked the run goes
    on unchecked and says so."""
    unknown = oh.make_sequence_type_proto(oh.make_tensor_type_proto(1, None))  # elements of no known shape
    model = _model([oh.make_value_info("m", unknown)], [oh.make_node("SequenceLength", ["m"], ["y"])],
                   [oh.make_tensor_value_info("y", 7, [])])
    with pytest.raises(feeds.CannotGenerate):
        feeds.make_inputs(model)
    with pytest.raises(feeds.CannotGenerate, match="input 'm' has no shape"):
        graphopt.optimize(model)
    result = graphopt.optimize(model, allow_unchecked=True)
    assert result.report.validation is None
    assert any(n.startswith("not checked numerically (--allow-unchecked): input 'm' has no shape") for n in result.report.notes)


def _non_numeric_cases() -> list[str]:
    names = []
    for name, case in sorted(node_suite.cases().items()):
        for i in case.model.graph.input:
            kind = i.type.WhichOneof("value")
            if kind in ("sequence_type", "optional_type", "map_type") or (
                    kind == "tensor_type" and i.type.tensor_type.elem_type == onnx.TensorProto.STRING):
                names.append(name)
                break
    return names


@pytest.mark.parametrize("name", _non_numeric_cases())
def test_node_cases_with_non_numeric_inputs_optimize_without_user_inputs(name):
    case = node_suite.cases()[name]
    try:
        node_suite.baseline(case)
    except node_suite.NotRunnable as exc:
        pytest.skip(f"onnxruntime itself does not run this case correctly: {exc}")
    model = graphopt.load(case.model)
    result = graphopt.optimize(model, allow_unchecked=True)  # generated inputs check every step, or a note says why not
    checked = result.report.validation is not None
    assert checked or any("not checked" in n or "checks are off" in n for n in result.report.notes), result.report.notes
    if checked:
        assert result.report.validation.passed
