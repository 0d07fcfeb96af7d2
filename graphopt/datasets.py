"""The user's own data as calibration batches.

    text_batches(FILE, tokenizer, model)   # --calib-text: one example a line
    image_batches(DIR, model, processor)   # --calib-images: a folder of images (any depth)

Text is tokenized with the model folder's tokenizer (or `--tokenizer DIR`); each batch is
padded to its own longest example (never to an arbitrary length), unless the model's sequence
axis is static, then to that; examples longer than the model takes are truncated. Images are
preprocessed as the folder's image processor says, or else resized to `--image-size` (or the
model's own static size; an image of another size is an error then), scaled to [0, 1] and
normalized by `--mean` / `--std`; they are taken in a seeded random order, so that a folder
sorted by class gives both halves every class. The batches go to graphopt.calibration as a
list: the first half fits, the second half is held out and is what fidelity is measured on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import InputError
from graphopt.model import Model

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def from_files(model: Model, folder: Path | None, *, text: str | None = None, images: str | None = None,
               calib: str | None = None, tokenizer: str | None = None, batch: int = 16,
               image_size: tuple[int, int] | None = None, mean: tuple[float, ...] | None = None,
               std: tuple[float, ...] | None = None) -> list[dict[str, np.ndarray]] | None:
    """The batches of `--calib-text` or `--calib-images` (None when neither is given): the text
    tokenized with `tokenizer` (a folder) or the model folder's; the images preprocessed by the
    model folder's image processor unless `image_size`, `mean` or `std` say how."""
    from graphopt import folders

    given = [flag for flag, value in (("--calib", calib), ("--calib-text", text), ("--calib-images", images)) if value]
    if len(given) > 1:
        raise InputError(f"{' and '.join(given)} both given", hint="pass one source of calibration data")
    if text:
        source = Path(tokenizer) if tokenizer else folder
        made = folders.preprocessor(source) if source is not None else None
        if not folders.is_tokenizer(made):
            raise InputError("--calib-text needs a tokenizer", hint="pass --tokenizer DIR (a folder with tokenizer.json), "
                             "or a model folder that has one")
        return text_batches(text, made, model, batch=batch)
    if images:
        explicit = image_size is not None or mean is not None or std is not None
        made = folders.preprocessor(folder) if folder is not None and not explicit else None
        made = None if made is None or folders.is_tokenizer(made) else made  # a tokenizer is no image processor
        return image_batches(images, model, made, batch=batch, size=image_size, mean=mean, std=std)
    return None


def parse_size(text: str) -> tuple[int, int]:
    """`--image-size`: N or HxW."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(text)
    return (int(parts[0]), int(parts[-1]))


def parse_floats(text: str) -> tuple[float, ...]:
    """`--mean` / `--std`: one number, or one per channel, comma-separated."""
    return tuple(float(p) for p in text.split(","))


def read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the calibration text {path} ({exc})", hint="one UTF-8 example a line") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def text_batches(path: str | Path, tokenizer: Any, model: Model, batch: int = 16) -> list[dict[str, np.ndarray]]:
    """Token-id batches of the file's lines for `model`'s inputs; at least two (fit, held out)."""
    lines = read_lines(path)
    inputs = {v.name: v for v in model.ir.graph.inputs}
    if "input_ids" not in inputs:
        raise InputError(f"--calib-text gives token ids, but the model's inputs are {', '.join(inputs)}",
                         hint="calibrate it with --calib data.npz of those inputs")
    unknown = [n for n in inputs if n not in TOKEN_INPUTS]
    if unknown:
        raise InputError(f"--calib-text fills {', '.join(n for n in TOKEN_INPUTS if n in inputs)}, not the model's "
                         f"input '{unknown[0]}'", hint="calibrate it with --calib data.npz of every input")
    if len(lines) < 2:
        raise InputError(f"{path} has {len(lines)} example(s); calibration needs at least 2 (half to fit, half to measure)",
                         hint="one example a line; a few hundred give steady numbers")
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # causal LMs' tokenizers have none; the mask hides it
    size = min(batch, len(lines) // 2)
    shape = inputs["input_ids"].shape
    static = shape[1] if shape is not None and len(shape) > 1 and isinstance(shape[1], int) else None
    limit = static or min(int(getattr(tokenizer, "model_max_length", 512) or 512), 4096)
    out = []
    for start in range(0, size * math.ceil(len(lines) / size), size):
        chunk = lines[start:start + size]
        if not chunk:
            break
        encoded = tokenizer(chunk, padding="max_length" if static else True, truncation=True, max_length=limit,
                            return_tensors="np")
        feeds = {}
        for name in inputs:
            if name not in encoded:
                raise InputError(f"the tokenizer gives no '{name}', which the model takes",
                                 hint="pass --tokenizer DIR of the model's own tokenizer")
            feeds[name] = encoded[name].astype(np.int64)
        out.append(feeds)
    return out


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--calib-images {folder} is not a folder", hint="a folder of images (subfolders are read too)")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_batches(folder: str | Path, model: Model, processor: Any = None, batch: int = 16,
                  size: tuple[int, int] | None = None, mean: tuple[float, ...] | None = None,
                  std: tuple[float, ...] | None = None, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Pixel batches of the folder's images for `model`'s one image input; at least two."""
    name, channels, model_size = _image_input(model)
    files = image_files(folder)
    if len(files) < 2:
        raise InputError(f"{folder} has {len(files)} image(s); calibration needs at least 2 (half to fit, half to measure)",
                         hint=f"images with a suffix among {', '.join(IMAGE_SUFFIXES)}; a few hundred give steady numbers")
    files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    step = min(batch, len(files) // 2)
    out, expected = [], model_size
    for start in range(0, len(files), step):
        chunk = files[start:start + step]
        images = [_open(f, channels) for f in chunk]
        if processor is not None:
            pixels = np.asarray(processor(images=images, return_tensors="np")["pixel_values"], np.float32)
        else:
            for im, f in zip(images, chunk):  # without a processor or --image-size, no image is resized
                expected = expected or (im.height, im.width)
                if size is None and (im.height, im.width) != expected:
                    against = f"the model's input '{name}' takes" if model_size else "the first image is"
                    raise InputError(f"the image {f} is {im.height}x{im.width}, but {against} {expected[0]}x{expected[1]}",
                                     hint="pass --image-size HxW to resize every image")
            pixels = np.stack([_pixels(im, size, mean, std) for im in images])
        if model_size is not None and tuple(pixels.shape[2:]) != model_size:
            raise InputError(f"the images come out {pixels.shape[2]}x{pixels.shape[3]}, but the model's input "
                             f"'{name}' takes {model_size[0]}x{model_size[1]}",
                             hint=f"pass --image-size {model_size[0]}x{model_size[1]}")
        out.append({name: pixels})
    return out


def _image_input(model: Model) -> tuple[str, int, tuple[int, int] | None]:
    """The model's one 4-D float input: its name, channel count, and (height, width) where static."""
    inputs = list(model.ir.graph.inputs)
    found = [v for v in inputs if v.shape is not None and len(v.shape) == 4 and v.dtype is not None and v.dtype.is_floating_point()]
    if len(inputs) != 1 or len(found) != 1:
        names = ", ".join(f"{v.name} {list(v.shape) if v.shape is not None else '?'}" for v in inputs)
        raise InputError(f"--calib-images gives one [N, C, H, W] pixel input, but the model's inputs are {names}",
                         hint="calibrate it with --calib-text (token ids) or --calib data.npz of those inputs")
    shape = list(found[0].shape)
    if not isinstance(shape[1], int):
        raise InputError(f"the model's input '{found[0].name}' has no static channel count {shape}",
                         hint="calibrate it with --calib data.npz")
    hw = (shape[2], shape[3]) if isinstance(shape[2], int) and isinstance(shape[3], int) else None
    return found[0].name, shape[1], hw


def _open(path: Path, channels: int):
    from PIL import Image, UnidentifiedImageError

    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
    if mode is None:
        raise InputError(f"the model takes {channels}-channel images; --calib-images reads 1, 3 or 4 channels",
                         hint="calibrate it with --calib data.npz")
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"cannot read the image {path} ({exc})", hint="remove it from the folder, or re-save it") from None


def _pixels(image, size: tuple[int, int] | None, mean, std) -> np.ndarray:
    """[C, H, W] float32: resized to `size` (height, width) when given, scaled to [0, 1], then
    (x - mean) / std per channel."""
    from PIL import Image

    if size is not None and (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    x = np.asarray(image, np.float32) / 255.0
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    if mean is not None:
        x = x - np.asarray(mean, np.float32).reshape(-1, 1, 1)
    if std is not None:
        x = x / np.asarray(std, np.float32).reshape(-1, 1, 1)
    return x
