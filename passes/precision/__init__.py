"""Reduced precision (approximate): int8 post-training quantization under a fidelity bound.

`sites` (what can go to int8), `ranges` (activation ranges and the int8 arithmetic), `smooth`
(SmoothQuant as an exact re-parameterization), `gain` (each layer's measured int8 speed-up),
`qdq` (the emitted QuantizeLinear / DequantizeLinear form), `step` (the approximate step).
bf16 / fp16 are lowering choices (OpenVINO's precision hints under `--target cpu`).
"""

from graphopt.passes.precision.step import QuantizeInt8
from graphopt.registry import register_approximate

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "auto")


def _step(value: str, options):
    """int8 (and auto) quantize; fp32 / bf16 / fp16 are read by the lowering (no graph change)."""
    return QuantizeInt8(options) if value in ("int8", "auto") else None


register_approximate("precision", _step, choices=lambda: PRECISIONS)
