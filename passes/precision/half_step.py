"""bf16 / fp16 as an approximate step (`precision="bf16" | "fp16"` without `--target cpu`, where
OpenVINO's lowering measures the precision hint against the converted graph instead).

1. The model is made portable (graphopt's functions inlined: a norm becomes the standard op the
   conversion keeps in float32; a GELU's body goes to 16 bits) and converted (half.py).
2. Fidelity on held-out inputs, measured on the rounding emulation in onnxruntime (the CPU
   provider has no bf16 kernels and runs fp16 ops it lacks in float32, so the 16-bit file
   itself would measure too well here).
3. Below the bound: the model stays float32, said so.
Refused up front for `--target ort-cpu` (no bf16 kernels, slow x64 fp16: int8 is its route).
"""

from __future__ import annotations

from graphopt import calibration, fidelity, registry, verify
from graphopt.errors import InputError
from graphopt.model import Model
from graphopt.passes.precision import half
from graphopt.steps import ApproximateStep, Approximation, Options
from graphopt.passes.precision import details as precision_details

RULE = "ConvertTo16Bit"


class ConvertHalf(ApproximateStep):
    """The graph in bf16 / fp16, inputs and outputs float32, accumulating ops in float32."""

    name = "convert-precision"

    def __init__(self, options: Options, precision: str) -> None:
        super().__init__(options)
        if options.target == "ort-cpu":
            raise InputError(f"--precision {precision} with --target ort-cpu: onnxruntime's CPU provider has no bf16 "
                             "kernels and its x64 fp16 paths are slower than float32",
                             hint="use --precision int8 for onnxruntime on CPU, or --target cpu (OpenVINO's hints)")
        self.precision = precision

    def approximate(self, model: Model) -> Approximation:
        work = model.clone()
        registry.get("make-portable")(work.ir)
        converted, info = half.convert(work, self.precision)
        emulated, _ = half.convert(work, self.precision, emulate=True)
        data = calibration.split(model, self.options.calib, seed=self.options.seed, dims=self.options.dims)
        references = [verify.run(self.options.reference_for(model), f) for f in data.held]
        measured = fidelity.end_to_end(references, emulated, data.held)
        report = {"precision": self.precision, "conversion": info, "calibration": data.describe(), "end_to_end": measured,
                  "measured_on": "the rounding emulation in onnxruntime (16-bit storage, float32 accumulation)"}
        if fidelity.worst_mean_cosine(measured) < self.options.fidelity:
            report["note"] = (f"the {self.precision} graph's mean cosine is below the bound {self.options.fidelity}: "
                              "the model stays float32")
            return Approximation(model, {}, report)
        return Approximation(converted, {RULE: info["nodes_in_low_precision"]}, report)

    def details(self, report):
        return precision_details.converted(report, self.options.fidelity)
