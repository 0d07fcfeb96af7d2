"""The HTML report page (issue 15): written for an exact run, a mixer run and an int8 run, it
parses, holds every step, needs nothing from the network, renders the same from the JSON
alone, and renders in a real headless browser (Debian's chromium) to a screenshot."""

from __future__ import annotations

import html.parser
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import graphopt
import models
from graphopt import headline, report_html

pytestmark = pytest.mark.filterwarnings("ignore")
DIMS = {"batch": 2, "seq": 16}
GRAPHOPT = str(Path(sys.executable).with_name("graphopt"))


class _Page(html.parser.HTMLParser):
    """Tags opened and closed, text, and anything that would fetch."""

    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.stack, self.text, self.fetches, self.errors = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "link", "iframe", "img") or "src" in attrs or (tag == "a" and "href" in attrs):
            self.fetches.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = models.export(*models.transformer("bert", "eager"), tmp_path_factory.mktemp("page") / "bert.onnx", "legacy")
    exact = graphopt.optimize(path, dims=DIMS)
    mixer = graphopt.optimize(exact.model, passes=["eliminate-dead-code"], mixer="linear:hedgehog", layers="all",
                              dims=DIMS, calib_steps=5)
    int8 = graphopt.optimize(exact.model, passes=["eliminate-dead-code"], precision="int8", fidelity=0.0, dims=DIMS)
    for result in (mixer, int8):  # the headline's speed-up (the exact run's page goes without one)
        result.measure(rounds=3)
    return {"exact": exact.report, "mixer": mixer.report, "int8": int8.report}


@pytest.mark.parametrize("run", ["exact", "mixer", "int8"])
def test_the_page_holds_every_step_and_fetches_nothing(runs, run, tmp):
    report = runs[run]
    path = report.write(tmp / "r.html")
    text = path.read_text()
    page = _parse(text)
    assert not page.errors and not page.stack, page.errors[:5]
    assert not page.fetches  # inline CSS and SVG only: it opens without a network
    words = " ".join(page.text)
    assert all(step.name in words for step in report.steps)
    for section in ("Plan", "Model before and after", "Machine"):
        assert f"<h2>{section}</h2>" in text
    assert graphopt.machine.cpu_model() in words
    assert text.count("<svg") >= (3 if run != "exact" else 1)  # histogram; fidelity charts with the bound
    if run != "exact":
        assert "<h2>Fidelity</h2>" in text and "bound" in words
    # the page opens with the result: speed-up (where timed), fidelity, runtime and precision, size
    result = report.to_dict()["result"]
    assert text.index("Result:") < text.index("<h2>Plan</h2>")
    assert f"onnxruntime ({result['precision']})" in words and "weights" in words
    if run == "exact":
        assert "not timed" in words and "outputs equal (passed" in words
    else:
        assert headline.line(result) in words and result["speedup"] > 0
        assert "held-out examples: mean cosine" in words
        assert result["precision"] in (("int8", "fp32") if run == "int8" else ("fp32",))  # int8 where a layer is faster here


def test_a_json_written_earlier_renders_the_same_page(runs, tmp):
    report = runs["mixer"]
    json_path = report.write(tmp / "r.json")
    first = report_html.render(json.loads(json_path.read_text()))
    assert first == report_html.render(json.loads(json_path.read_text()))  # deterministic
    done = subprocess.run([GRAPHOPT, "report", str(json_path), "-o", str(tmp / "again.html")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    again = (tmp / "again.html").read_text().replace("graphopt report: r.json", "graphopt report")
    # the same tables and charts (chart geometry may differ by a font metric from process to process)
    def without_charts(page: str) -> str:
        return re.sub(r"<svg.*?</svg>", "<svg/>", page, flags=re.S)

    assert without_charts(again) == without_charts(first) and again.count("<svg") == first.count("<svg")
    bad = subprocess.run([GRAPHOPT, "report", str(tmp / "missing.json"), "-o", str(tmp / "x.html")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not found" in bad.stderr and not (tmp / "x.html").exists()


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_the_page_renders_in_a_headless_browser(runs, tmp):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium here (make test installs Debian's chromium when apt-get can; it could not)")
    page = runs["mixer"].write(tmp / "r.html")
    shot = tmp / "shot.png"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert (width, height) == (1200, 2400)
    assert shot.stat().st_size > 30_000  # tables and charts, not a blank page
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    shown = [t.strip() for t in _parse(dom).text if t.strip()]  # the page's text as the browser holds it, in order
    start = shown.index("Result:")
    assert re.search(r"x (faster|slower) in onnxruntime \(fp32\)", shown[start + 1]) and start < shown.index("Plan"), shown[start:start + 3]


def test_view_serves_netron_on_localhost_then_stops(runs, tmp):
    pytest.importorskip("netron", reason="the view extra (netron) is not installed")
    import socket
    import urllib.request

    model = tmp / "m.onnx"
    graphopt.save(graphopt.load(models.export(*models.transformer("bert", "eager"), tmp / "b.onnx", "legacy")), model)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([GRAPHOPT, "view", str(model), str(model), "--no-browser", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline().strip() for _ in range(2)]
        assert lines == [f"serving {model} at http://localhost:{port}", f"serving {model} at http://localhost:{port + 1}"]
        for p in (port, port + 1):
            with urllib.request.urlopen(f"http://localhost:{p}/", timeout=30) as answer:
                assert answer.status == 200 and b"<html" in answer.read().lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    missing = subprocess.run([GRAPHOPT, "view", str(tmp / "nope.onnx"), "--no-browser"], capture_output=True, text=True)
    assert missing.returncode == 2 and "model not found" in missing.stderr


def test_bench_report_page_has_the_contenders(tmp):
    model = tmp / "m.onnx"
    graphopt.save(graphopt.load(models.export(*models.transformer("bert", "eager"), tmp / "b.onnx", "legacy")), model)
    done = subprocess.run([GRAPHOPT, "bench", str(model), "--against", "original", "--rounds", "3", "--dims", "batch=2,seq=16",
                           "--report", str(tmp / "bench.html")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = (tmp / "bench.html").read_text()
    page = _parse(text)
    assert not page.errors and not page.fetches
    assert "<h3>benchmark</h3>" in text and "original" in " ".join(page.text) and "graphopt" in " ".join(page.text)
