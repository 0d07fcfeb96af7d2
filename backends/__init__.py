"""Backends that run or compile graphopt models: onnxruntime (`ort`) and TVM (`tvm`)."""
