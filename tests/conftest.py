import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py, tests/node_suite.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

NODE_SUITE = {"passed": 0, "not_runnable": 0, "xfailed": 0}


def pytest_terminal_summary(terminalreporter):
    if any(NODE_SUITE.values()):
        terminalreporter.write_line(
            f"ONNX node suite: {NODE_SUITE['passed']} cases that onnxruntime runs correctly passed through graphopt "
            f"(load->save and optimize), {NODE_SUITE['xfailed']} listed exceptions, "
            f"{NODE_SUITE['not_runnable']} not runnable by onnxruntime itself (skipped with reasons; -rs lists them)"
        )


@pytest.fixture
def tmp(tmp_path):
    return tmp_path
