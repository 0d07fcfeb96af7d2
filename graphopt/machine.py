"""What this machine is: the CPU model and the instruction-set flags that decide which
reduced-precision and integer kernels the runtimes can use. Read at run time, never assumed:
the machines this runs on differ from day to day."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# Flags that change what is fastest: bf16/fp16 dot products, AMX tiles, int8 dot products.
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_bf16",
                     "amx_int8", "amx_fp16")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    fields: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The flags of FLAGS_THAT_MATTER this CPU has."""
    have = set(_cpuinfo().get("flags", "").split())
    return [f for f in FLAGS_THAT_MATTER if f in have]


def has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def has_fp16() -> bool:
    return bool({"avx512_fp16", "amx_fp16"} & set(cpu_flags()))


def describe() -> dict[str, object]:
    """{"cpu", "flags", "cores"}: what every benchmark table and lowering report names."""
    return {"cpu": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count()}


def line() -> str:
    d = describe()
    return f"CPU: {d['cpu']} ({d['cores']} cores; {', '.join(d['flags']) or 'no avx512/amx flags'})"


RUNTIMES = ("onnx", "onnx-ir", "onnxscript", "onnxruntime", "openvino", "apache-tvm", "torch")


def versions() -> dict[str, str]:
    """Installed versions of the runtimes and libraries a run depends on (read from package
    metadata: nothing is imported)."""
    from importlib import metadata

    found = {}
    for name in RUNTIMES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
