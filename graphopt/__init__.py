"""graphopt: compiler-style graph rewriting for neural networks.

    model = graphopt.load("model.onnx")            # or a torch module + example_inputs
    result = graphopt.optimize(model, preset="exact")
    graphopt.save(result.model, "model.opt.onnx")
    print(result.report.to_dict())

    result = graphopt.optimize(model, target="ort-cpu")  # + measured lowering for onnxruntime CPU
    print(graphopt.bench("model.onnx").to_dict())       # vs the original and the anchors, in one process

    result = graphopt.optimize(model, target="cpu")     # the runtime measured fastest here
    outputs = result.session().run(feeds)               # runs there, whichever won
    outputs = graphopt.session("model.opt.onnx").run(feeds)  # the same from a saved file
"""

from graphopt.errors import (
    BackendError,
    GraphoptError,
    InputError,
    NumericMismatchError,
    PassError,
    UnsupportedModelError,
)
from graphopt.benchmark import bench
from graphopt.exporters import save
from graphopt.importers import load
from graphopt.model import Model
from graphopt.optimizer import OptimizeResult, optimize
from graphopt.summary import summarize
from graphopt.verify import Validation, validate

__version__ = "0.1.0"


def session(model, **options):
    """Something with `run(feeds) -> {output: array}` for a model or a saved file, in the runtime
    its metadata names (graphopt's `--target cpu` writes it; onnxruntime when none)."""
    from graphopt import runtimes

    return runtimes.executable_for(model if isinstance(model, Model) else load(model), **options)


def inspect(model) -> dict:
    """Inputs, outputs, op histogram, parameters, opsets, size, and the attention layers found."""
    return summarize(load(model), attention=True)

__all__ = [
    "BackendError",
    "GraphoptError",
    "InputError",
    "Model",
    "NumericMismatchError",
    "OptimizeResult",
    "PassError",
    "UnsupportedModelError",
    "Validation",
    "bench",
    "inspect",
    "load",
    "optimize",
    "save",
    "session",
    "validate",
]
