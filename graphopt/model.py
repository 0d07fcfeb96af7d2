"""graphopt's model object: an onnx_ir model plus where it came from."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from graphopt.ir import ir


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
        files = set()
        for g in self.ir.graphs():
            for v in g.initializers.values():
                t = v.const_value
                if isinstance(t, ir.ExternalTensor):
                    files.add(Path(os.path.join(t.base_dir, t.location)).resolve())
        return files


def mapped_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    """The model's initializers read lazily from memory-mapped external data."""
    return [v.const_value for g in model.graphs() for v in g.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)]


def unmap(tensors, *, keep: ir.Model | None = None) -> int:
    """Close the memory maps of `tensors` (all but those `keep` still reads) so their pages
    leave the process's resident set; a tensor read again maps again. One whose array is still
    referenced elsewhere stays mapped. How many were closed."""
    live = {id(v.const_value) for g in keep.graphs() for v in g.initializers.values()
            if v.uses() or v.is_graph_output()} if keep is not None else set()  # an unused one is dead here
    closed = 0
    for tensor in tensors:
        if id(tensor) in live or tensor.raw is None:
            continue
        try:
            tensor.release()
            closed += 1
        except BufferError:  # a view of the mapping is still alive; its pages stay
            pass
    return closed


def _tensor_nbytes(tensor) -> int:
    if tensor is None:
        return 0
    try:
        return int(tensor.nbytes)
    except (AttributeError, TypeError, ValueError):
        return 0
