"""Shared by the node-suite test and its survey: run one ONNX backend node case three ways.

A case counts when onnxruntime itself, on the case's own model, reproduces the
expected outputs. graphopt must then reproduce them after load -> save and
after `optimize` with the default preset.
"""

from __future__ import annotations

import functools
import tempfile
import warnings
from pathlib import Path

import onnx
from onnx.backend.test.runner import Runner

import graphopt
from graphopt import sessions as ort_backend


@functools.lru_cache(maxsize=1)
def cases() -> dict:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {c.name: c for c in collect_testcases()}


class NotRunnable(Exception):
    """onnxruntime cannot run the case's own model, or does not reproduce its outputs."""


def _run_all(model: bytes | str, case) -> None:
    session = ort_backend.session(model).session
    names = [i.name for i in session.get_inputs()]
    for inputs, expected in case.data_sets:
        got = session.run(None, dict(zip(names, inputs)))
        Runner.assert_similar_outputs(list(expected), got, rtol=case.rtol, atol=case.atol)


def baseline(case) -> None:
    model = case.model
    if model.ir_version > ort_backend.max_ir_version():
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.ir_version = ort_backend.max_ir_version()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _run_all(model.SerializeToString(), case)
    except Exception as exc:  # any failure of ORT on the untouched model
        raise NotRunnable(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}") from None


def through_graphopt(case, *, optimize: bool) -> None:
    model = graphopt.load(case.model)
    if optimize:
        model = graphopt.optimize(model, validate=False).model
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{case.name}.onnx"
        graphopt.save(model, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _run_all(str(path), case)
