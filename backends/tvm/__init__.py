"""The Apache TVM runtime: ONNX -> Relax -> a compiled, optionally MetaSchedule-tuned artifact.

The only package in graphopt that imports tvm, and only when called (the `tvm` extra:
apache-tvm 0.27 with apache-tvm-ffi pinned to 0.1.14.post1; 0.1.15 segfaults on IR
serialization, which MetaSchedule needs).

Lowering path: shape specialization (graphopt/specialize.py: symbolic dims bound from the
user's shapes, shape computations folded, since TVM's ONNX frontend fails on the dynamo
exporter's dynamic Reshapes) -> graphopt functions inlined (canonical attention and norms
become their standard-op reference bodies; TVM's frontend rejects calls into custom
domains) -> Constant attributes rewritten to `value` tensors (the frontend reads only
those) -> `relax.frontend.onnx.from_onnx` -> `tvm.compile` with the default Relax pipeline
(it fuses; the plain call does not on CPU) or, with a tuning database, MetaSchedule's
compile. Artifacts are `export_library` shared objects with a JSON sidecar (`OUT.so.json`)
naming the inputs, outputs, shapes and target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import onnx.numpy_helper

from graphopt import atomic, exporters, registry
from graphopt.errors import BackendError, InputError, first_line
from graphopt.model import Model
from graphopt.specialize import specialize

logger = logging.getLogger(__name__)

TARGETS = ("llvm", "cuda")
DEFAULT_CUDA_ARCH = "sm_90"
META_SUFFIX = ".json"
# MetaSchedule builders import TVM's tensor intrinsics first (~17 s here), so the default 30 s
# build timeout kills builds; graphopt sets its own.
BUILD_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 60.0


def _tvm():
    # TVM's CPU runtime uses one thread unless told otherwise: default to every core.
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        import tvm
        from tvm import relax  # noqa: F401
    except ImportError as exc:
        raise BackendError(f"the TVM backend needs Apache TVM, which does not import ({exc})",
                           hint="pip install 'graphopt[tvm]' (apache-tvm with apache-tvm-ffi==0.1.14.post1)") from None
    return tvm


def make_target(kind: str = "llvm", *, arch: str | None = None, cores: int | None = None):
    """A TVM target: `llvm` for this host's CPU (its -mcpu, all its cores), or `cuda` for `arch`."""
    tvm = _tvm()
    if kind == "llvm":
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": cores or os.cpu_count() or 1})
    if kind == "cuda":
        host = tvm.target.Target({"kind": "llvm"})
        return tvm.target.Target({"kind": "cuda", "arch": arch or DEFAULT_CUDA_ARCH}, host=host)
    raise InputError(f"unknown TVM target '{kind}'", hint=f"choose from {', '.join(TARGETS)}")


@dataclasses.dataclass
class Signature:
    inputs: list[dict[str, Any]]  # name, dtype, shape
    outputs: list[str]
    target: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Compiled:
    executable: Any  # relax.VMExecutable
    signature: Signature
    tuned: bool = False
    tuning_records: int = 0
    untuned_kernels: list[str] = dataclasses.field(default_factory=list)  # TVM could not generate their search space


def to_relax(model: Model, shapes: Mapping[str, Sequence[int]] | None = None):
    """(Relax IRModule, Signature) for `model` specialized to `shapes`."""
    tvm = _tvm()
    from tvm.relax.frontend.onnx import from_onnx

    spec = specialize(model, shapes or {})
    proto = onnx.inliner.inline_local_functions(exporters.to_proto(spec))
    _constants_as_tensors(proto.graph)
    inits = {i.name for i in proto.graph.initializer}
    inputs = [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
               "shape": [d.dim_value for d in v.type.tensor_type.shape.dim]}
              for v in proto.graph.input if v.name not in inits]
    signature = Signature(inputs, [o.name for o in proto.graph.output], "")
    try:
        mod = from_onnx(proto, shape_dict={i["name"]: i["shape"] for i in inputs},
                        dtype_dict={i["name"]: i["dtype"] for i in inputs}, keep_params_in_input=False)
    except Exception as exc:  # the frontend raises many types; the user needs the op that failed
        raise BackendError(f"TVM's ONNX frontend cannot import the model: {first_line(exc, 300)}",
                           hint="run `graphopt optimize` first, or report the op named above") from None
    return tvm.relax.transform.DecomposeOpsForInference()(mod), signature


def compile(model: Model, *, target: str = "llvm", shapes: Mapping[str, Sequence[int]] | None = None,
            arch: str | None = None, tuning_db: str | os.PathLike | None = None, trials: int = 0,
            progress: Callable[[int, int], None] | None = None, runner: Any = None) -> Compiled:
    """Compile `model` for `target`. With `tuning_db`, tune `trials` MetaSchedule trials into
    that directory's JSON database (records already there are kept and reused; trials=0
    compiles from the database without measuring) and compile with the tuned schedules.
    `runner`: where trials are measured (default: this machine; `rpc_runner(...)` for remote
    devices behind TVM's RPC tracker)."""
    tvm = _tvm()
    from tvm import relax

    mod, signature = to_relax(model, shapes)
    tvm_target = make_target(target, arch=arch)
    signature.target = str(tvm_target)
    try:
        if tuning_db is None:
            executable = tvm.compile(mod, tvm_target, relax_pipeline=relax.get_default_pipeline(tvm_target))
            return Compiled(executable, signature)
        skipped: list[str] = []
        database = tune(mod, tvm_target, Path(tuning_db), trials, progress, runner, skipped)
        from tvm.s_tir.meta_schedule.relax_integration import compile_relax

        executable = compile_relax(database, mod, tvm_target, params=None)
        return Compiled(executable, signature, True, len(database), skipped)
    except BackendError:
        raise
    except Exception as exc:
        logger.debug("TVM compile failed", exc_info=True)
        raise BackendError(f"TVM could not compile the model for {target}: {type(exc).__name__}: {first_line(exc, 300)}",
                           hint="rerun with --debug for TVM's traceback") from None


def tune(mod, target, work_dir: Path, trials: int, progress: Callable[[int, int], None] | None = None,
         runner: Any = None, skipped: list[str] | None = None):
    """MetaSchedule tuning into work_dir's JSON database, reused across runs. Records are
    committed as they are measured, so an interrupted run keeps what it found. Kernels
    whose design space TVM cannot generate (a ScheduleError on some fused masks here) are
    left to the default schedule and named in `skipped`."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule import relax_integration as ri

    work_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(path_workload=str(work_dir / "database_workload.json"),
                                        path_tuning_record=str(work_dir / "database_tuning_record.json"))
    if trials <= 0:
        return database
    # The kernels compile_relax will look up: the same legalization and fusion it applies.
    with target, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                          relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                          relax.transform.FuseTIR()])(mod)
    # MetaSchedule configures its loggers by handler name from whatever handlers its logger
    # already has: handlers of an earlier run (another work_dir's log file) or unnamed ones
    # (a host application's) make it fail with "'NoneType' object has no attribute 'format'".
    # Each run starts from a clean logger and logs into its own work_dir.
    for handler in list(logging.getLogger("tvm.s_tir.meta_schedule").handlers):
        logging.getLogger("tvm.s_tir.meta_schedule").removeHandler(handler)
        handler.close()
    contexts, weights = ri.extracted_tasks_to_tune_contexts(ri.extract_tasks(fused, target, None), str(work_dir))
    kept = []
    for context, weight in zip(contexts, weights):
        try:
            context.generate_design_space()
            kept.append((context, weight))
        except Exception:  # TVM's schedule rules fail on some fused kernels; they keep the default schedule
            if skipped is not None:
                skipped.append(context.task_name)
    if not kept:
        return database
    records = work_dir / "database_tuning_record.json"
    with _watch(records, trials, progress):
        ri.tune_tasks(tasks=[c for c, _ in kept], task_weights=[w for _, w in kept], work_dir=str(work_dir),
                      max_trials_global=trials, num_trials_per_iter=min(trials, 16),
                      builder=ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S),
                      runner=runner or ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S), database=database)
    return database


def rpc_runner(tracker_host: str, tracker_port: int, device_key: str, *, timeout_s: float = RUN_TIMEOUT_S):
    """A MetaSchedule runner measuring on remote devices through TVM's RPC tracker
    (`python -m tvm.exec.rpc_tracker`, then `python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`
    on each device); pass it to `tune_relax(runner=...)`."""
    from tvm.s_tir import meta_schedule as ms

    config = ms.runner.RPCConfig(tracker_host=tracker_host, tracker_port=tracker_port, tracker_key=device_key,
                                 session_timeout_sec=int(timeout_s))
    return ms.runner.RPCRunner(rpc_config=config)


@contextlib.contextmanager
def _watch(records: Path, total: int, progress: Callable[[int, int], None] | None):
    """Report the number of measured records once a second while tuning runs."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def poll():
        while not stop.wait(1.0):
            progress(_count_lines(records), total)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        progress(_count_lines(records), total)


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def export(compiled: Compiled, path: str | os.PathLike) -> Path:
    """Write the artifact (shared library) and its signature sidecar, each atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.staged(path) as stage:  # the sidecar first, the library last
        try:
            compiled.executable.export_library(str(stage / path.name))
        except Exception as exc:
            raise BackendError(f"TVM could not write the library: {first_line(exc, 300)}",
                               hint="export_library needs a C compiler (gcc or clang) on PATH") from None
        (stage / (path.name + META_SUFFIX)).write_text(json.dumps(compiled.signature.to_dict(), indent=1))
    return path


@dataclasses.dataclass
class TvmExecutable:
    vm: Any
    device: Any
    signature: Signature

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i["name"] for i in self.signature.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.signature.outputs)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tvm = _tvm()
        args = []
        for spec in self.signature.inputs:
            if spec["name"] not in feeds:
                raise InputError(f"input '{spec['name']}' is missing", hint=f"the artifact takes {', '.join(self.input_names)}")
            array = np.ascontiguousarray(feeds[spec["name"]])
            if list(array.shape) != spec["shape"] or array.dtype.name != spec["dtype"]:
                raise InputError(f"input '{spec['name']}' is {array.dtype.name}{list(array.shape)}, the artifact was "
                                 f"compiled for {spec['dtype']}{spec['shape']}", hint="compile again with --shapes")
            args.append(tvm.runtime.tensor(array, self.device))
        result = self.vm["main"](*args)
        results = [result] if hasattr(result, "numpy") else list(result)
        return {name: r.numpy() for name, r in zip(self.signature.outputs, results)}


def prepare(compiled: Compiled, device: str = "cpu") -> TvmExecutable:
    tvm = _tvm()
    dev = tvm.cpu() if device == "cpu" else tvm.cuda()
    return TvmExecutable(tvm.relax.VirtualMachine(compiled.executable, dev), dev, compiled.signature)


def load(path: str | os.PathLike, device: str | None = None) -> TvmExecutable:
    """Load an artifact written by `export` (the .so and its .so.json)."""
    tvm = _tvm()
    path = Path(path)
    meta = Path(str(path) + META_SUFFIX)
    if not path.is_file() or not meta.is_file():
        raise InputError(f"{path} is not a graphopt TVM artifact (needs {path.name} and {meta.name})")
    signature = Signature(**json.loads(meta.read_text()))
    device = device or ("cuda" if signature.target.startswith("cuda") else "cpu")
    try:
        lib = tvm.runtime.load_module(str(path))
        dev = tvm.cpu() if device == "cpu" else tvm.cuda()
        return TvmExecutable(tvm.relax.VirtualMachine(lib, dev), dev, signature)
    except Exception as exc:
        raise BackendError(f"TVM cannot load {path}: {first_line(exc, 300)}",
                           hint="load it with the tvm and tvm-ffi versions that compiled it, on a matching device") from None


def _constants_as_tensors(graph: onnx.GraphProto) -> None:
    """Constant(value_float | value_int | value_floats | value_ints) -> Constant(value=tensor)."""
    kinds = {"value_float": (np.float32, "f"), "value_int": (np.int64, "i"),
             "value_floats": (np.float32, "floats"), "value_ints": (np.int64, "ints")}
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for attr in list(node.attribute):
            if attr.name in kinds:
                dtype, field = kinds[attr.name]
                value = getattr(attr, field)
                array = np.array(list(value) if field in ("floats", "ints") else value, dtype=dtype)
                node.attribute.remove(attr)
                node.attribute.append(onnx.helper.make_attribute("value", onnx.numpy_helper.from_array(array)))


class TvmRuntime:
    """TVM for the llvm target (CPU), compiled at the model's own (float32) precision; shapes are
    bound at compile time (`shapes=`), which a saved graphopt ONNX model does not record."""

    name = "tvm"
    precisions = ("fp32",)
    lowering: tuple[str, ...] = ()  # specialization and inlining happen inside `compile`
    needs_shapes = True  # compile wants every input's static shape

    def supports(self, precision: str) -> bool:
        return precision in self.precisions

    @staticmethod
    def load(path: str | os.PathLike, **options: Any) -> TvmExecutable:
        return load(path, **options)

    def compile(self, model, precision: str | None = None, *, shapes: Mapping[str, Sequence[int]] | None = None,
                target: str = "llvm", **_: Any) -> TvmExecutable:
        """Options of other runtimes (onnxruntime's `provider`, OpenVINO's `threads`) do not apply."""
        if precision not in (None, *self.precisions):
            raise InputError(f"the TVM runtime compiles float32 models, not '{precision}'")
        if not isinstance(model, Model):
            from graphopt import importers

            model = importers.load(model)
        return prepare(compile(model, target=target, shapes=shapes))


RUNTIME = registry.register_runtime(TvmRuntime())
