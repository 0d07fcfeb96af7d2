"""graphopt's model object: an onnx_ir model plus where it came from."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from graphopt.ir import ir

RUNTIME_KEY = "graphopt.runtime"  # model metadata: the runtime --target cpu chose ("onnxruntime" or "openvino")
PRECISION_KEY = "graphopt.precision"  # model metadata: the precision that runtime compiles it at (graphopt's names)
DISABLED_KEY = "graphopt.ort.disabled_optimizers"  # model metadata: onnxruntime transformers its sessions skip


@dataclasses.dataclass
class Model:
    """An ONNX model held as `onnx_ir.Model`.

    `source` is the file the model was loaded from, if any; `save` refuses to
    overwrite it unless forced.
    """

    ir: ir.Model
    source: Path | None = None

    @property
    def graph(self) -> ir.Graph:
        return self.ir.graph

    def clone(self) -> Model:
        """A structural copy; tensors (including lazy external ones) are shared, not copied."""
        return Model(self.ir.clone(), self.source)

    def parameter_bytes(self) -> int:
        return sum(_tensor_nbytes(v.const_value) for g in self.ir.graphs() for v in g.initializers.values())

    def external_files(self) -> set[Path]:
        """The external-data files the model's lazy tensors read from."""
        return {Path(os.path.join(t.base_dir, t.location)).resolve() for t in mapped_tensors(self.ir)}


def fingerprint(model: ir.Model) -> tuple:
    """What a pass can change, cheaply: every node's op and wiring, every initializer's tensor
    object (rewrites make new tensors; none edits one in place; shape inference re-registers
    them in another order), the functions."""
    graph = model.graph
    return (tuple((n.domain, n.op_type, tuple(id(v) for v in n.inputs), tuple(id(v) for v in n.outputs),
                   tuple((k, id(a.value) if a.type == ir.AttributeType.TENSOR else repr(a.value))
                         for k, a in n.attributes.items()))
                  for n in graph),
            tuple(sorted((name, id(v.const_value)) for name, v in graph.initializers.items())),  # order: not the function
            tuple(id(v) for v in graph.outputs), tuple(sorted(model.functions)))


def mapped_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    """The model's initializers read lazily from memory-mapped external data."""
    return [v.const_value for g in model.graphs() for v in g.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)]


def is_read(value: ir.Value) -> bool:
    """Whether anything reads the value: a node, or the graph's outputs."""
    return bool(value.uses()) or value.is_graph_output()


def release(tensor: ir.ExternalTensor) -> None:
    """Close the tensor's memory map so its pages leave the process's resident set; it maps
    again when read. One whose array is still referenced elsewhere stays mapped."""
    if tensor.raw is None:
        return
    try:
        tensor.release()
    except BufferError:  # a view of the mapping is still alive; its pages stay
        pass


def unmap(tensors, *, keep: ir.Model | None = None) -> None:
    """`release` every one of `tensors` but those an initializer of `keep` still holds and
    something reads (an unused initializer is dead here)."""
    live = {id(v.const_value) for g in keep.graphs() for v in g.initializers.values() if is_read(v)} \
        if keep is not None else set()
    for tensor in tensors:
        if id(tensor) not in live:
            release(tensor)


def _tensor_nbytes(tensor) -> int:
    if tensor is None:
        return 0
    try:
        return int(tensor.nbytes)
    except (AttributeError, TypeError, ValueError):
        return 0
