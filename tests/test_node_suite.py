"""Peer suite: every ONNX backend node case that onnxruntime runs correctly must still
give the case's expected outputs, with the case's tolerances, after load -> save
through graphopt and after `optimize` with the default preset."""

from __future__ import annotations

import pytest

import node_suite
from conftest import NODE_SUITE

# Cases onnxruntime runs correctly but graphopt does not, each with its reason.
# Empty: all 1,333 pass. A new entry needs a reason and an issue.
KNOWN_FAILURES: dict[str, str] = {}

CASES = sorted(node_suite.cases())


@pytest.mark.parametrize("name", CASES)
def test_node_case(name):
    case = node_suite.cases()[name]
    try:
        node_suite.baseline(case)
    except node_suite.NotRunnable as exc:
        NODE_SUITE["not_runnable"] += 1
        pytest.skip(f"onnxruntime itself does not run this case correctly: {exc}")
    if name in KNOWN_FAILURES:
        NODE_SUITE["xfailed"] += 1
        pytest.xfail(KNOWN_FAILURES[name])
    node_suite.through_graphopt(case, optimize=False)
    node_suite.through_graphopt(case, optimize=True)
    NODE_SUITE["passed"] += 1


def test_suite_is_large():
    """Guards against the collection silently shrinking (an onnx upgrade, a broken import)."""
    assert len(CASES) > 1500
