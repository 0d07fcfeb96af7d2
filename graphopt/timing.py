"""Timing contenders in one process. `interleaved`: every contender runs once per round, so
machine noise (other tenants, frequency changes) spreads over all of them alike. `in_blocks`:
each contender runs a few calls in a row per round, for contenders that disturb whoever runs
right after them (onnxruntime sessions whose threads spin)."""

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


def in_blocks(contenders: Mapping[str, Callable[[], object]], *, rounds: int = 5, block: int = 3,
              warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call, per contender: each round runs every contender `block` times in a row
    and keeps its fastest call. For sessions whose threads spin (onnxruntime's default): a
    session's pool spins on after each run and takes cores from the next one, so interleaving
    call by call would charge one session for another's spinning."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            calls = []
            for _ in range(block):
                start = time.perf_counter()
                fn()
                calls.append(time.perf_counter() - start)
            times[name].append(min(calls))
    return times


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}
