"""Reduced precision (approximate): int8 post-training quantization under a fidelity bound.

`sites` (what can go to int8), `ranges` (activation ranges and the int8 arithmetic), `smooth`
(SmoothQuant as an exact re-parameterization), `gain` (each layer's measured int8 speed-up),
`qdq` (the emitted QuantizeLinear / DequantizeLinear form), `bias` (bias correction after
rounding), `step` (the int8 approximate step); `int4` (weight-only MatMulNBits for onnxruntime); `half` (bf16 / fp16 graph conversion) and
`half_step` (its approximate step). Under `--target cpu` bf16 / fp16 are the lowering's choice:
OpenVINO's precision hint against the converted graph, measured (backends/cpu.py).
"""

from graphopt.passes.precision.half_step import ConvertHalf
from graphopt.passes.precision.int4 import QuantizeInt4
from graphopt.passes.precision.step import INT8_FORMS, QuantizeInt8
from graphopt.registry import register_approximate
from graphopt.steps import StepOption

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4", "auto")


def _step(value: str, options):
    """int8 (and auto) quantize; bf16 / fp16 convert the graph, except under `--target cpu`, whose
    lowering measures them (hint or converted graph); fp32 changes nothing."""
    if value in ("int8", "auto"):
        return QuantizeInt8(options)
    if value == "int4":
        return QuantizeInt4(options)
    if value in ("bf16", "fp16") and options.target != "cpu":
        return ConvertHalf(options, value)
    return None


OPTIONS = (
    StepOption("int8_form", "auto", "with --precision int8 or auto: auto (each MatMul takes static QDQ or the "
               "dynamic-activation form quantize_dynamic writes, whichever gains more per error; onnxruntime "
               "targets) | static | dynamic (every MatMul dynamic; Conv stays static)", choices=lambda: INT8_FORMS),
)

register_approximate("precision", _step, choices=lambda: PRECISIONS, options=OPTIONS)
