"""onnxruntime sessions, in the core: every check graphopt makes runs in one.

What the installed onnxruntime accepts (IR version, opset), validation sessions (CPU execution
provider, ORT's own graph optimizations off, so a comparison measures graphopt's rewrites and
nothing else) and the optimizing sessions a user gets (`session_for`: with the graph
transformers a graphopt model's metadata asks to disable). The onnxruntime *runtime*
(backends/ort/: its lowering, its measured selection) builds on these.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx.helper
import onnxruntime as ort

from graphopt.errors import BackendError, first_line
from graphopt.model import DISABLED_KEY

CPU = "CPUExecutionProvider"


@functools.lru_cache(maxsize=None)
def max_ir_version() -> int:
    """The newest ONNX IR version the installed onnxruntime loads (probed once)."""
    for version in range(onnx.IR_VERSION, 3, -1):
        if _loads(_probe_model(version, 13)):
            return version
    raise BackendError("onnxruntime loads no ONNX IR version this onnx package writes", hint="reinstall onnxruntime")


@functools.lru_cache(maxsize=None)
def max_opset() -> int:
    """The newest default-domain opset the installed onnxruntime loads (probed once)."""
    ir_version = max_ir_version()
    for opset in range(onnx.defs.onnx_opset_version(), 6, -1):
        if _loads(_probe_model(ir_version, opset)):
            return opset
    raise BackendError("onnxruntime loads no opset this onnx package knows", hint="reinstall onnxruntime")


def _probe_model(ir_version: int, opset: int) -> bytes:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model.SerializeToString()


def _loads(model: bytes) -> bool:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model, options, providers=[CPU])
        return True
    except Exception:
        return False


@dataclasses.dataclass
class OrtExecutable:
    session: ort.InferenceSession

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.session.get_inputs())

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.session.get_outputs())

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self.session.run(None, dict(feeds))
        except Exception as exc:
            raise BackendError(f"onnxruntime failed to run the model: {first_line(exc, 1000)}") from None
        return dict(zip(self.output_names, results))


def session(
    model: bytes | str,
    *,
    optimize: bool = False,
    providers: Sequence[str] = (CPU,),
    threads: int | None = None,
    disabled_optimizers: Sequence[str] = (),
    spinning: bool = True,
) -> OrtExecutable:
    """An onnxruntime session over serialized model bytes or a model path.
    `disabled_optimizers`: onnxruntime graph transformers to skip (e.g. SkipLayerNormFusion).
    `spinning=False`: worker threads sleep as soon as a run ends. Timing several sessions
    in one process needs it: a session's pool keeps spinning after each run and steals the
    cores from the next session (measured here, MiniLM at seq 128: 17 ms alone, 45 ms
    interleaved with three other sessions, 20 ms interleaved without spinning). The
    process-wide thread pool would avoid it too, but once set, every later session in the
    process (the user's included) must use it."""
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 4  # errors reach the user as BackendError, not as ORT's log lines
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
    try:
        return OrtExecutable(ort.InferenceSession(model, options, providers=list(providers),
                                                  disabled_optimizers=list(disabled_optimizers) or None))
    except Exception as exc:
        raise BackendError(f"onnxruntime cannot load the model: {first_line(exc, 400)}") from None



def session_for(model_path_or_bytes: str | bytes, provider: str = CPU, *, disabled: tuple[str, ...] | None = None,
                spinning: bool = False) -> OrtExecutable:
    """An optimizing onnxruntime session with the transformers a graphopt model asks to disable.
    Without thread spinning by default: graphopt times sessions side by side (see `session`)."""
    if disabled is None:
        disabled = tuple(disabled_in(model_path_or_bytes))
    return session(model_path_or_bytes, optimize=True, providers=(provider,), disabled_optimizers=disabled,
                   spinning=spinning)


def disabled_in(model_path_or_bytes: str | bytes) -> list[str]:
    """The onnxruntime graph transformers a graphopt model's metadata asks to disable."""
    proto = (onnx.load(model_path_or_bytes, load_external_data=False) if isinstance(model_path_or_bytes, (str, os.PathLike))
             else onnx.load_from_string(model_path_or_bytes))
    value = {p.key: p.value for p in proto.metadata_props}.get(DISABLED_KEY, "")
    return [v for v in value.split(",") if v]
