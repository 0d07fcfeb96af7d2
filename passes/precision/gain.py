"""What int8 buys each layer on this machine: the layer alone, at its calibrated input shape,
timed as float and as QDQ (interleaved, one process) in the runtime the model is going to:
onnxruntime, or, under `--target cpu`, OpenVINO with the float precision its lowering would use
(bf16 when reduced precision is allowed and the CPU has it: int8 must beat bf16 there, not
float32). Layers of one shape share one measurement."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh

from graphopt import registry, timing
from graphopt.passes.precision import dynamic
from graphopt.passes.precision.ranges import ActRange, quantize_weight
from graphopt.passes.precision.sites import Site

ROUNDS = 20


DYNAMIC = "dynamic"  # `act` for the dynamic-activation form (dynamic.py)


def layer_model(site: Site, x_shape, act: ActRange | str | None) -> bytes:
    node, w = site.node, site.w
    attrs = {k: a.value for k, a in node.attributes.items()}
    inits, nodes = [], []
    if act == DYNAMIC:
        q, scales = quantize_weight(w, site.axis)
        inits += [onnx_tensor(q, "Wq"), onnx_tensor(scales, "ws"), onnx_tensor(np.zeros_like(scales, np.int8), "wz")]
        graph = oh.make_graph(dynamic.layer_nodes("x", "Wq", "ws", "wz", "y"), "layer",
                              [oh.make_tensor_value_info("x", 1, list(x_shape))], [oh.make_tensor_value_info("y", 1, None)], inits)
        return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8).SerializeToString()
    if act is None:
        inits.append(onnx_tensor(w, "W"))
        weight = "W"
        x = "x"
    else:
        q, scales = quantize_weight(w, site.axis)
        inits += [onnx_tensor(q, "Wq"), onnx_tensor(scales, "ws"), onnx_tensor(np.zeros_like(scales, np.int8), "wz"),
                  onnx_tensor(np.array(act.scale, np.float32), "xs"), onnx_tensor(np.array(act.zero_point, np.uint8), "xz")]
        nodes += [oh.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                  oh.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                  oh.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["Wd"], axis=site.axis)]
        weight, x = "Wd", "xd"
    extra = [v for v in site.node.inputs[2:] if v is not None]  # Gemm's C, Conv's bias: constants (see measure)
    for i, value in enumerate(extra):
        inits.append(onnx_tensor(np.asarray(value.const_value.numpy()), f"extra{i}"))
    nodes.append(oh.make_node(node.op_type, [x, weight, *[f"extra{i}" for i in range(len(extra))]], ["y"], **attrs))
    graph = oh.make_graph(nodes, "layer", [oh.make_tensor_value_info("x", 1, list(x_shape))],
                          [oh.make_tensor_value_info("y", 1, None)], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8).SerializeToString()


def onnx_tensor(array: np.ndarray, name: str):
    import onnx.numpy_helper

    return onnx.numpy_helper.from_array(np.ascontiguousarray(array), name)


def measure(site: Site, x_shape, act: ActRange | str, cache: dict, where: tuple[str, str | None] = ("onnxruntime", None)
            ) -> tuple[float, float] | None:
    """(float ms, int8 ms) of the layer alone at `x_shape`, or None when it cannot be built alone
    (a bias or other input that is not constant). `where`: the runtime that times it and the
    precision it compiles the float form at (graphopt.runtimes: e.g. ("openvino", "bf16")).
    `act` DYNAMIC: the dynamic-activation form."""
    key = (where, act == DYNAMIC, site.node.op_type, tuple(x_shape), site.w.shape,
           repr(sorted((k, repr(a.value)) for k, a in site.node.attributes.items())), len(site.node.inputs))
    if key in cache:
        return cache[key]
    if any(i is not None and i.const_value is None for i in site.node.inputs[2:]):
        cache[key] = None
        return None
    x = {"x": np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
    models = {"float": layer_model(site, x_shape, None), "int8": layer_model(site, x_shape, act)}
    runtime = registry.runtime(where[0])
    sessions = {k: runtime.compile(m, where[1]) for k, m in models.items()}
    medians = timing.medians(timing.interleaved({k: (lambda s=s: s.run(x)) for k, s in sessions.items()}, rounds=ROUNDS))
    cache[key] = (medians["float"] * 1e3, medians["int8"] * 1e3)
    return cache[key]


def measure_models(float_model, int8_model, feeds, where: tuple[str, str | None], rounds: int = 10) -> tuple[float, float]:
    """(float ms, int8 ms) of two whole models on `feeds` in the runtime `where` names (the float
    form at its precision), interleaved: for what only acts in context (a quantizer that fuses
    into the layer before it)."""
    runtime = registry.runtime(where[0])
    runs = {k: runtime.compile(m, where[1]) for k, m in (("float", float_model), ("int8", int8_model))}
    medians = timing.medians(timing.interleaved({k: (lambda r=r: r.run(feeds)) for k, r in runs.items()},
                                                rounds=rounds, warmup=1))
    return medians["float"] * 1e3, medians["int8"] * 1e3
