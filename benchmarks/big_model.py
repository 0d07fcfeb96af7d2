"""Peak RSS of graphopt.load + graphopt.save on a model with external data.

Builds a model of SIZE_GB (default 3) of float32 weights in an external data
file (written in chunks, so building it needs little memory), then, in a fresh
child process, loads it with graphopt, saves it elsewhere (external data is
automatic above 2 GB) and reports that child's peak RSS against the model size.
Target: peak RSS well under twice the model size.

    .venv/bin/python benchmarks/big_model.py [--size-gb 3] [--dir /tmp/graphopt-big]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper

sys.path.insert(0, str(Path(__file__).parents[1]))
from graphopt import machine  # noqa: E402

TENSOR_ELEMS = 8192 * 8192  # 256 MiB of float32 per initializer


def build(directory: Path, size_gb: float) -> Path:
    n = max(1, round(size_gb * 2**30 / (TENSOR_ELEMS * 4)))
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "big.onnx.data"
    initializers, nodes, offset = [], [], 0
    with open(data, "wb") as f:
        for i in range(n):
            chunk = np.full(TENSOR_ELEMS // 16, i + 1, np.float32).tobytes()
            for _ in range(16):
                f.write(chunk)
            t = onnx.TensorProto(name=f"w{i}", data_type=onnx.TensorProto.FLOAT, dims=[8192, 8192])
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(TENSOR_ELEMS * 4))):
                t.external_data.add(key=k, value=v)
            initializers.append(t)
            offset += TENSOR_ELEMS * 4
            nodes.append(onnx.helper.make_node("Add", [f"h{i}" if i else "x", f"w{i}"], [f"h{i + 1}" if i < n - 1 else "y"]))
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8192, 8192])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8192, 8192])
    graph = onnx.helper.make_graph(nodes, "big", [x], [y], initializer=initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = directory / "big.onnx"
    onnx.save(model, path)
    return path


CHILD = r"""
import json, resource, sys, time
import graphopt
t0 = time.perf_counter()
m = graphopt.load(sys.argv[1])
t1 = time.perf_counter()
graphopt.save(m, sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "save_s": t2 - t1, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> int:
    print(machine.line(), flush=True)  # the machines differ from day to day: name the CPU
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument("--dir", default="/tmp/graphopt-big")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    directory = Path(args.dir)
    try:
        source = build(directory, args.size_gb)
        size = sum(p.stat().st_size for p in directory.iterdir())
        out = directory / "out" / "big.saved.onnx"
        proc = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out)], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return 1
        stats = json.loads(proc.stdout)
        saved = out.with_name(out.name + ".data")
        same = saved.stat().st_size == (directory / "big.onnx.data").stat().st_size
        with open(saved, "rb") as a, open(directory / "big.onnx.data", "rb") as b:
            a.seek(-4096, os.SEEK_END), b.seek(-4096, os.SEEK_END)
            same = same and a.read() == b.read()
        ratio = stats["peak_rss_bytes"] / size
        print(f"model size        {size / 2**30:.2f} GiB (external data)")
        print(f"load              {stats['load_s']:.2f} s")
        print(f"save              {stats['save_s']:.2f} s (external data written automatically: {saved.exists()})")
        print(f"peak RSS          {stats['peak_rss_bytes'] / 2**30:.2f} GiB = {ratio:.2f}x the model size (target < 2x)")
        print(f"data identical    {same}")
        return 0 if ratio < 2 and same else 1
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
