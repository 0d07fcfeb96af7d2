"""The onnxruntime runtime: its lowering rewrites (`lowering`: contrib and ONNX attention,
Skip*Norm), its measured selection (`select`: the `ort-cpu` / `ort-cuda` lowering steps) and
the runtime object the core reaches it by. Sessions themselves are in the core
(graphopt/sessions.py): every check runs in one."""

from __future__ import annotations

import os
from typing import Any

from graphopt import exporters, registry, sessions
from graphopt.backends.ort import lowering, select  # noqa: F401  (register the lowering passes and targets)
from graphopt.errors import InputError
from graphopt.model import Model


class OrtRuntime:
    """onnxruntime, an optimizing default session (with any transformers the model disables)."""

    name = "onnxruntime"
    precisions = ("fp32", "int8", "int4")  # int8 and int4 are in the graph (QDQ, MatMulNBits), not a hint
    lowering: tuple[str, ...] = ()  # chosen by measurement per model (select.py), not fixed
    needs_shapes = False  # compile wants every input's static shape

    def supports(self, precision: str) -> bool:
        return precision in self.precisions

    def compile(self, model: Model | bytes | str | os.PathLike, precision: str | None = None, *,
                provider: str = sessions.CPU, **_: Any):
        if precision not in (None, *self.precisions):
            raise InputError(f"onnxruntime runs precision '{precision}' only as the model's own graph",
                             hint=f"it takes {', '.join(self.precisions)}; bf16 / fp16 hints are OpenVINO's")
        data = model if isinstance(model, (bytes, str, os.PathLike)) else exporters.to_proto(model).SerializeToString()
        return sessions.session_for(os.fspath(data) if isinstance(data, os.PathLike) else data, provider)


RUNTIME = registry.register_runtime(OrtRuntime())
