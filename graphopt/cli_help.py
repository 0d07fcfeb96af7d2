"""What `graphopt --help` opens with (SUMMARY) and the examples each command's help ends with."""

from __future__ import annotations

SUMMARY = """graphopt rewrites a neural network (ONNX, or a torch module via `convert`) into a faster one that
computes the same thing, or one within a fidelity bound you set, and picks the fastest runtime on this machine."""
EXAMPLES = {
    None: ["graphopt optimize model.onnx -o fast.onnx --target cpu            # exact rewrites, fastest runtime here",
           "graphopt optimize model.onnx -o int8.onnx --target cpu --precision auto --fidelity 0.995 --calib calib.npz"
           "   # int8/bf16 within a bound",
           "graphopt optimize model.onnx -o mixed.onnx --preset mixers --mixer linear:hedgehog --calib calib.npz"
           "   # attention swapped for a mixer"],
    "inspect": ["graphopt inspect model.onnx"],
    "optimize": ["graphopt optimize model.onnx -o fast.onnx --target cpu --report report.html",
                 "graphopt optimize model.onnx -o small.onnx --approx prune,int8 --fidelity 0.99 --calib calib.npz"],
    "validate": ["graphopt validate model.onnx fast.onnx --inputs data.npz"],
    "compile": ["graphopt compile fast.onnx -o model.so --backend tvm"],
    "run": ["graphopt run fast.onnx --inputs data.npz -o outputs.npz"],
    "bench": ["graphopt bench model.onnx --target cpu --against original,openvino-fp32"],
    "report": ["graphopt report report.json -o report.html"],
    "view": ["graphopt view model.onnx fast.onnx"],
    "passes": ["graphopt passes"],
    "convert": ["graphopt convert factory.py:make -o model.onnx"],
}


def _examples(command: str | None) -> str:
    lines = EXAMPLES.get(command, [])
    return ("examples:\n" if len(lines) > 1 else "example:\n") + "\n".join(f"  {line}" for line in lines)
