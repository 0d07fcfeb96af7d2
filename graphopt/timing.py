"""Timing contenders in one process, in rounds: every contender runs in every round, so machine
noise (other tenants, frequency changes) spreads over all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def interleaved(contenders: Mapping[str, Callable[[], object]], *, rounds: int = 20, warmup: int = 3,
                block: int = 1) -> dict[str, list[float]]:
    """Seconds per call, per contender: `warmup` untimed rounds, then `rounds` timed ones. Each
    round runs every contender `block` times in a row and keeps its fastest call. block=1 is
    call by call; larger blocks are for contenders that disturb whoever runs right after them
    (onnxruntime sessions whose threads spin on after a run and take cores from the next one)."""
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
