"""Issue 30 item 2: calibration from a folder of the user's images (`--calib-images DIR`),
preprocessed by the model folder's image processor or by --image-size / --mean / --std; bad
folders and images that do not fit exit 2 with one line and write nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx.parser
import pytest
import torch
from PIL import Image

import graphopt
from graphopt import datasets, verify
from graphopt.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore")
CLI = str(Path(sys.executable).with_name("graphopt"))


def _digits_folder(root: Path, count: int = 60) -> tuple[Path, np.ndarray]:
    """scikit-learn's 8x8 digits as grayscale PNGs in one folder per class (values 0..16 -> 0..255),
    and the images as the model takes them ([N, 1, 8, 8] in [0, 1], in file-name order)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    folder = root / "digits"
    for i in range(count):
        (folder / str(data.target[i])).mkdir(parents=True, exist_ok=True)
        pixels = np.round(data.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / str(data.target[i]) / f"{i:04d}.png")
    return folder, (np.round(data.images[:count] * 255 / 16) / 255).astype(np.float32)[:, None]


def _conv_model(size: int = 8) -> onnx.ModelProto:
    """A small trained-looking convnet head for [N, 1, size, size] images (seeded weights)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(16 * size * size, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    return graphopt.load(net, example_inputs=(torch.rand(2, 1, size, size),), dynamic_shapes=({0: "batch"},))


def test_a_digits_folder_gives_the_pixels_in_a_seeded_order_with_every_class_in_both_halves(tmp_path):
    folder, want = _digits_folder(tmp_path)
    model = _conv_model()
    batches = datasets.image_batches(folder, model, batch=10)
    assert len(batches) == 6 and all(list(b) == [model.ir.graph.inputs[0].name] for b in batches)
    got = np.concatenate([next(iter(b.values())) for b in batches])
    assert got.shape == (60, 1, 8, 8) and got.dtype == np.float32
    files = datasets.image_files(folder)
    order = np.random.default_rng(0).permutation(len(files))
    by_file = {f.name: i for i, f in enumerate(sorted(files, key=lambda f: f.name))}  # the PNGs are named by index
    np.testing.assert_allclose(got, want[[by_file[files[i].name] for i in order]], atol=1e-6)
    halves = [{files[i].parent.name for i in order[:30]}, {files[i].parent.name for i in order[30:]}]
    assert len(halves[0]) >= 8 and len(halves[1]) >= 8  # a class-sorted folder is not split by class
    resized = datasets.image_batches(folder, _conv_model(16), batch=10, size=(16, 16), mean=(0.5,), std=(0.25,))
    assert next(iter(resized[0].values())).shape == (10, 1, 16, 16)
    first = np.asarray(Image.open(files[order[0]]).resize((16, 16), Image.Resampling.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(next(iter(resized[0].values()))[0, 0], (first - 0.5) / 0.25, atol=1e-5)


def test_an_image_folder_is_preprocessed_as_its_image_processor_says(tmp_path):
    import transformers

    torch.manual_seed(0)
    vit = tmp_path / "vit"
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=4, num_channels=3, num_labels=10)
    transformers.ViTForImageClassification(config).eval().save_pretrained(vit)
    processor = transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.4, 0.5, 0.6],
                                               image_std=[0.2, 0.25, 0.3])
    processor.save_pretrained(vit)
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):  # sizes unlike the model's: the processor resizes
        Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8), "RGB").save(images / f"{i}.jpg")
    model = graphopt.load(vit)
    batches = datasets.from_files(model, vit, images=str(images), batch=4)
    files = datasets.image_files(images)
    order = np.random.default_rng(0).permutation(len(files))
    want = processor(images=[Image.open(files[i]).convert("RGB") for i in order[:4]], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(batches[0]["pixel_values"], want, rtol=1e-6)
    done = _cli("optimize", vit, "-o", tmp_path / "v.onnx", "--calib-images", images, "--precision", "int8",
                "--fidelity", "0.9")
    assert done.returncode == 0, done.stderr
    assert "held-out rows: 4" in " ".join(done.stdout.split())
    assert (tmp_path / "v.preprocessor" / "preprocessor_config.json").is_file()
    assert verify.load_problem(graphopt.load(tmp_path / "v.onnx")) is None


def test_a_digits_folder_calibrates_int8_from_the_cli(tmp_path):
    folder, _ = _digits_folder(tmp_path)
    path = tmp_path / "cnn.onnx"
    graphopt.save(_conv_model(16), path)
    done = _cli("optimize", path, "-o", tmp_path / "q.onnx", "--calib-images", folder, "--image-size", "16",
                "--precision", "int8", "--fidelity", "0.99", "--calib-batch", "10")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "held-out rows: 30" in text and "generated" not in text
    # the summary opens with the result, timed against the input
    assert re.search(r"result: \d+\.\d\dx (faster|slower) in onnxruntime \((int8|fp32)\): [\d.]+ -> [\d.]+ ms at input \[10, 1, 16, 16\];",
                     text), text[:300]
    assert verify.load_problem(graphopt.load(tmp_path / "q.onnx")) is None


def _cli(*args):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True)


def _refused(done, words: str) -> None:
    assert done.returncode == 2, done.stderr
    assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_images_that_do_not_fit_are_refused_with_one_line(tmp_path):
    folder, _ = _digits_folder(tmp_path, count=6)
    path = tmp_path / "cnn16.onnx"
    graphopt.save(_conv_model(16), path)
    out = tmp_path / "o.onnx"
    _refused(_cli("optimize", path, "-o", out, "--calib-images", folder, "--precision", "int8"),
             "is 8x8, but the model's input 'input' takes 16x16")
    (tmp_path / "two").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(tmp_path / "two" / "a.png")
    _refused(_cli("optimize", path, "-o", out, "--calib-images", tmp_path / "two", "--precision", "int8"),
             "has 1 image(s); calibration needs at least 2")
    (tmp_path / "two" / "b.png").write_bytes(b"not a png")
    _refused(_cli("optimize", path, "-o", out, "--calib-images", tmp_path / "two", "--precision", "int8"),
             f"cannot read the image {tmp_path / 'two' / 'b.png'}")
    text = tmp_path / "text.onnx"
    graphopt.save(graphopt.load(onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 17]>
        g (int64[N, S] input_ids) => (int64[N, S] y) { y = Identity(input_ids) }""")), text)
    _refused(_cli("optimize", text, "-o", out, "--calib-images", folder, "--precision", "int8"),
             "--calib-images gives one [N, C, H, W] pixel input, but the model's inputs are input_ids")
    (tmp_path / "s.txt").write_text("a\nb\n")
    _refused(_cli("optimize", path, "-o", out, "--calib-images", folder, "--calib-text", tmp_path / "s.txt"),
             "--calib-text and --calib-images both given")
    _refused(_cli("optimize", path, "-o", out, "--calib-images", tmp_path / "missing"), "is not a folder")
    assert not out.exists()
    with pytest.raises(InputError, match="but the first image is"):  # a dynamic-size model: one size for all
        model = graphopt.load(onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 17]>
            g (float[N, 1, H, W] x) => (float[N, 1, H, W] y) { y = Relu(x) }"""))
        Image.fromarray(np.zeros((9, 9), np.uint8), "L").save(folder / "0" / "zz.png")
        datasets.image_batches(folder, model, batch=2)
