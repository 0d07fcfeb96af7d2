"""The light model zoo shipped in the onnx package: load -> optimize -> validate,
and the optimized model reproduces the zoo's stored reference output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

import graphopt
from graphopt import verify
from openvino_check import assert_matches_in_openvino

ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = sorted(p.stem for p in ZOO.glob("light_*.onnx"))


# BatchNorms folded per model. DenseNet121 has 121 BNs: the 59 after a Conv fold; the other
# 62 are pre-activation (Concat -> BN -> Relu -> Conv) and no exact fold removes them.
GOLDEN = {
    "light_densenet121": {"FoldBatchNormIntoLinear": 59},
    "light_inception_v2": {"FoldBatchNormIntoLinear": 69},
    "light_resnet50": {"FoldBatchNormIntoLinear": 53},
    "light_shufflenet": {"FoldBatchNormIntoLinear": 49},
}
UNCOUNTED = {"RemoveDeadNodes", "RemoveDeadInitializers"}  # bookkeeping of the rewrites above


def test_zoo_present():
    assert len(MODELS) >= 9, MODELS


@pytest.mark.parametrize("name", MODELS)
def test_light_model(name, tmp):
    model = graphopt.load(ZOO / f"{name}.onnx")
    result = graphopt.optimize(model)
    assert result.report.validation is not None and result.report.validation.passed, result.report.validation.to_dict()
    assert all(p.status in ("applied", "no-op") for p in result.report.passes), [p.to_dict() for p in result.report.passes]
    assert {k: v for k, v in result.report.rewrites().items() if k not in UNCOUNTED} == GOLDEN.get(name, {})
    out = graphopt.save(result.model, tmp / f"{name}.opt.onnx")
    assert graphopt.validate(model, out).passed
    # The zoo's stored output was computed from an all-ones input (onnx's light model generator).
    reference = onnx.numpy_helper.to_array(onnx.load_tensor(str(ZOO / f"{name}_output_0.pb")))
    feeds = {v["name"]: np.ones(v["shape"], np.float32) for v in graphopt.inspect(model)["inputs"]}
    got = next(iter(verify.run(graphopt.load(out), feeds).values()))
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)
    assert_matches_in_openvino(result.model, feeds)  # portable output (issue 12)
