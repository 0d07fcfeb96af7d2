"""Generated inputs that fit: sizes for the free dims (and values for branch-selecting scalars)
at which the model runs in onnxruntime.

Defaults come first (batch 1, seq 128; `feeds.make_inputs`). When the model refuses them (a
Reshape whose target does not divide, a Conv whose input is too small, an LSTM state of the
wrong batch, an If branch that takes another sample rate), the search tries the model's own
sizes and values before common ones:

- sizes: the positive entries of constant shape tensors (Reshape / Expand / Tile targets,
  ConstantOfShape), then common sizes (1 to 640), the nearest the default first; batch
  dims are searched last and small (1, 2);
- values: for a scalar integer input, the constants it is compared with (Equal, Less, ...),
  e.g. the 16000 and 8000 of a sample-rate switch.

It tries one variable at a time, then pairs, then every free size at once, within a budget
of trials and seconds; the first binding the model runs at wins. When none does, the error
names the node that refused the defaults and why, and what to pass instead.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time
from collections.abc import Callable, Mapping

import numpy as np

from graphopt import feeds as feeds_mod
from graphopt.errors import GraphoptError, InputError
from graphopt.ir import ir
from graphopt.model import Model

COMMON_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 512, 640)
BATCH_SIZES = (1, 2)
MODEL_SIZES = 8  # the most frequent sizes read from the model, tried before the common ones
MAX_TRIALS = 400
MAX_SECONDS = 60.0
_SHAPE_READERS = {"Reshape": 1, "Expand": 1, "Tile": 1, "ConstantOfShape": 0}
_COMPARISONS = frozenset({"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"})
_PASS_THROUGH = frozenset({"Cast", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"})
_NODE_NAME = re.compile(r"running (\w+) node\. Name:'([^']*)'")


@dataclasses.dataclass
class Fit:
    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]  # the model's outputs on `feeds` (the checks' reference)
    dims: dict[str, int]  # the free dims' sizes that ran, by the key --dims takes
    values: dict[str, float]  # the selector inputs' values that ran
    trials: int  # bindings run, the defaults included

    def describe(self, seed: int) -> str:
        chosen = [f"{k}={v}" for k, v in {**self.dims, **self.values}.items()]
        searched = f"; found after {self.trials} tries: {', '.join(chosen)}" if self.trials > 1 else ""
        return f"generated (seed {seed}){searched}"


class NoFittingInputs(InputError):
    """No generated input runs the model; says where the defaults failed and what to pass."""


def fit(model: Model, run: Callable[[Model, dict], dict], *, seed: int = 0, dims: Mapping[str, int] | None = None,
        max_trials: int = MAX_TRIALS, max_seconds: float = MAX_SECONDS) -> Fit:
    """Generated inputs the model runs on (`run`: verify.run), searched as the module docstring
    says. `dims`: the user's sizes, never changed by the search. Raises `CannotGenerate` for
    inputs of a type generation cannot fill, `NoFittingInputs` when the budget runs out."""
    given = dict(dims or {})
    free = {k: places for k, places in feeds_mod.free_dims(model).items()
            if k not in given and not any(f"{i}:{a}" in given for i, a in places)}
    defaults = {**feeds_mod.DEFAULT_DIMS, **given}
    near = sorted(COMMON_SIZES, key=lambda n: abs(np.log(n / feeds_mod.DEFAULT_DIMS["seq"])))  # nearest the default first
    sizes = _ordered(_model_sizes(model) + near)
    # sizes first, batch dims last and small (a batch rarely constrains a model; a large one costs)
    keys = sorted(free, key=lambda k: _is_batch(k, free[k]))
    choices: dict[str, list] = {k: list(BATCH_SIZES) if _is_batch(k, free[k]) else sizes for k in keys}
    choices.update({name: _ordered(vals) for name, vals in _selector_values(model).items()})
    start, trials, first_error = time.perf_counter(), 0, None

    def attempt(binding: dict) -> Fit | None:
        nonlocal trials, first_error
        trials += 1
        bound_dims = {**defaults, **{k: v for k, v in binding.items() if k in free}}
        values = {k: v for k, v in binding.items() if k not in free}
        made = feeds_mod.make_inputs(model, seed=seed, dims=bound_dims, values=values)
        try:
            outputs = run(model, made)
        except GraphoptError as exc:
            first_error = first_error or str(exc)
            return None
        return Fit(made, outputs, {k: v for k, v in binding.items() if k in free}, values, trials)

    slowest = 0.0
    for binding in _bindings(choices, free):
        if trials >= max_trials or (trials and time.perf_counter() - start + slowest > max_seconds):
            break
        began = time.perf_counter()
        if (found := attempt(binding)) is not None:
            return found
        slowest = max(slowest, time.perf_counter() - began)
    raise NoFittingInputs(
        f"no generated input runs the model: at the default sizes {_where(first_error)}; tried {trials} "
        f"bindings of {', '.join(choices) or 'no free dims'}",
        hint="pass --inputs data.npz, or sizes with --dims (by name or input:axis, e.g. x:2=48); "
             "--allow-unchecked writes the output without numeric checks")


def _bindings(choices: Mapping[str, list], free: Mapping[str, list]):
    """The defaults, then each variable alone, then pairs, then every free size at once."""
    yield {}
    keys = list(choices)
    for key in keys:
        for value in choices[key]:
            yield {key: value}
    for a, b in itertools.combinations(keys, 2):
        for va, vb in itertools.product(choices[a], choices[b]):
            yield {a: va, b: vb}
    sizes = [k for k in keys if k in free]
    for value in (choices[sizes[0]] if sizes else ()):
        yield dict.fromkeys(sizes, value)


def _is_batch(key: str, places: list[tuple[str, int]]) -> bool:
    return "batch" in key.lower() or all(axis == 0 for _, axis in places)


def _where(error: str | None) -> str:
    """The innermost node an onnxruntime error names, and its reason."""
    if not error:
        return "it does not run"
    named = _NODE_NAME.findall(error)
    reason = error.rsplit("Status Message:", 1)[-1].strip().rstrip(".")
    reason = reason.split(" was false. ", 1)[-1][:240]  # after onnxruntime's failed assertion, if any
    if named:
        op, name = named[-1]
        return f"node '{name}' ({op}) refused them: {reason}"
    return f"it does not run: {reason}"


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _model_sizes(model: Model) -> list[int]:
    """The most frequent positive sizes in the model's constant shapes and initializer dims."""
    counts: dict[int, int] = {}
    graph = model.graph
    for node in graph:
        index = _SHAPE_READERS.get(node.op_type)
        if node.domain not in ("", "ai.onnx") or index is None or len(node.inputs) <= index:
            continue
        array = _const(node.inputs[index])
        if array is not None and array.dtype.kind == "i":
            for size in array.reshape(-1).tolist():
                if 1 < size <= 4096:
                    counts[size] = counts.get(size, 0) + 1
    return sorted(counts, key=lambda s: -counts[s])[:MODEL_SIZES]


def _selector_values(model: Model) -> dict[str, list]:
    """Scalar integer inputs compared with constants (through Casts and reshapes): those
    constants, e.g. {"sr": [16000, 8000]}."""
    found: dict[str, list] = {}
    for value in model.graph.inputs:
        if value.is_initializer() or value.dtype is None or not value.dtype.is_integer() or \
                value.shape is None or list(value.shape) not in ([], [1]):
            continue
        constants = []
        for reader in _readers_through(value):
            if reader.op_type in _COMPARISONS:
                for other in reader.inputs:
                    array = _const(other)
                    if array is not None and array.size == 1:
                        constants.append(array.reshape(()).item())
        if constants:
            found[value.name] = constants
    return found


def _readers_through(value: ir.Value, depth: int = 4) -> list[ir.Node]:
    readers = []
    for node, _ in value.uses():
        readers.append(node)
        if node.op_type in _PASS_THROUGH and depth:
            readers += _readers_through(node.outputs[0], depth - 1)
    return readers


def _const(value: ir.Value | None) -> np.ndarray | None:
    """An initializer's or Constant node's contents (onnx_ir's get_const_tensor), or None."""
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    try:
        return None if tensor is None else tensor.numpy()
    except Exception:  # a type numpy cannot hold
        return None
