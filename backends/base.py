"""The backend protocol: prepare a model once, run it many times."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np


class Executable(Protocol):
    """A model prepared for one backend and device."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str

    def prepare(self, model, **options) -> Executable: ...
