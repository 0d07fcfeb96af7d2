"""Interleaved timing: every contender runs once per round, in one process, so machine
noise (other tenants, frequency changes) spreads over all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def interleaved(contenders: Mapping[str, Callable[[], object]], *, rounds: int = 20, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call, per contender: `warmup` untimed rounds, then `rounds` timed ones."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}
