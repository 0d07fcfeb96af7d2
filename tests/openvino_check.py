"""One check the model-matrix tests share: the model, made portable, runs in OpenVINO (f32 hint)
and matches onnxruntime fp32 normwise at 1e-4."""

from __future__ import annotations

import graphopt
from graphopt import verify

RTOL = ATOL = 1e-4  # OpenVINO's kernels re-associate sums differently from ORT's; fp32 still


def assert_matches_in_openvino(model, feeds) -> None:
    from graphopt.backends import openvino

    portable = openvino.portable(model)
    assert not [n for n in portable.ir.graph if n.domain not in ("", "ai.onnx")], "not portable"
    got = openvino.compile(portable, precision="f32").run(feeds)
    checks = verify.compare_outputs(graphopt.verify.run(model, feeds), got, rtol=RTOL, atol=ATOL)
    assert all(c.passed for c in checks), [c.to_dict() for c in checks]
