"""The NNCF anchor, run in NNCF's own environment (nncf is not a project dependency):

    /path/to/nncf-venv/bin/python benchmarks/nncf_anchor.py MODEL.onnx CALIB.npz OUT.xml [transformer|cnn]

Reads the ONNX with OpenVINO, quantizes it with nncf.quantize (model_type=TRANSFORMER, or NNCF's default for a cnn) on the
calibration batches in CALIB.npz (arrays named `<input>.<batch index>`), and saves OpenVINO IR.
benchmarks/precision.py calls it with `--nncf-python` and times the result in its own process.
"""

from __future__ import annotations

import sys

import numpy as np


def main(model_path: str, calib_path: str, out: str, kind: str = "transformer") -> int:
    import nncf
    import openvino as ov

    data = np.load(calib_path)
    batches: dict[int, dict[str, np.ndarray]] = {}
    for key in data.files:
        name, _, index = key.rpartition(".")
        batches.setdefault(int(index), {})[name] = data[key]
    items = [batches[i] for i in sorted(batches)]
    model = ov.Core().read_model(model_path)
    rows = sum(next(iter(b.values())).shape[0] for b in items)
    model_type = nncf.ModelType.TRANSFORMER if kind == "transformer" else None
    quantized = nncf.quantize(model, nncf.Dataset(items), model_type=model_type, subset_size=rows)
    ov.save_model(quantized, out)
    print(f"nncf {nncf.__version__}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
