"""Atomic writes: every file graphopt writes (models and their external data, reports, .npz
inputs, OpenVINO IR, TVM libraries, measured-choice caches) goes into a staging folder beside
its target and is renamed into place, the named file last; a failure leaves no half-written
file, and the previous one (if any) untouched."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged(path: str | os.PathLike) -> Iterator[Path]:
    """A staging folder beside `path`: write every file there (the target under `path`'s name,
    companions under theirs); on a clean exit each is renamed beside `path`, the target last."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield stage
        for name in sorted(os.listdir(stage), key=lambda n: n == path.name):
            os.replace(stage / name, path.parent / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` into `path` atomically, with the permissions of an ordinary new file."""
    path = Path(path)
    with staged(path) as stage:
        (stage / path.name).write_text(text)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    with staged(path) as stage:
        (stage / path.name).write_bytes(data)
    return path
