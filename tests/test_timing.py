"""graphopt.timing: which calls each scheme makes and what it keeps (no clock is asserted)."""

from graphopt import timing


def _recorder(log, name, seconds):
    """A contender that logs its call and advances a fake clock by the next of `seconds`."""
    durations = iter(seconds)

    def call():
        log.append(name)
        timing.time.perf_counter.advance(next(durations))
    return call


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, dt):
        self.now += dt


def test_interleaved_runs_each_contender_once_per_round(monkeypatch):
    monkeypatch.setattr(timing.time, "perf_counter", _Clock())
    log = []
    times = timing.interleaved({"a": _recorder(log, "a", [9, 1, 2]), "b": _recorder(log, "b", [9, 3, 4])},
                               rounds=2, warmup=1)
    assert log == ["a", "b", "a", "b", "a", "b"]
    assert times == {"a": [1, 2], "b": [3, 4]}


def test_blocks_run_consecutive_calls_and_keep_the_fastest_of_each_block(monkeypatch):
    monkeypatch.setattr(timing.time, "perf_counter", _Clock())
    log = []
    times = timing.interleaved({"a": _recorder(log, "a", [9, 5, 1, 7, 2, 3, 8]),
                              "b": _recorder(log, "b", [9, 4, 6, 5, 1, 1, 2])}, rounds=2, block=3, warmup=1)
    assert log == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert times == {"a": [1, 2], "b": [4, 1]}
    assert timing.medians(times) == {"a": 1.5, "b": 2.5}
