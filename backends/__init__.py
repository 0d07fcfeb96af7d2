"""Backends that run or compile graphopt models: onnxruntime (`ort`, with the measured lowering
in `ort_select`) and TVM (`tvm`). Each runtime other than onnxruntime is imported only inside
its own module. `ort_select` registers the `ort-cpu` / `ort-cuda` lowering steps when the
registry loads the built-in families."""
