"""The runtimes graphopt lowers to, one package each, each behind graphopt.runtimes.Runtime:
`ort/` (onnxruntime: its lowering rewrites and measured selection; its sessions are in the core,
graphopt/sessions.py, because every check runs in one), `openvino/` and `tvm/` (each the only
package importing its runtime, lazily), and `cpu.py`, the `--target cpu` choice among them.
The registry imports them (graphopt/families.py); nothing in the core or in passes/ imports a
runtime package by name, except the CLI's compile command for runtime-specific options."""
