"""The user's own data as calibration batches: a text file, one example a line
(`--calib-text FILE`), tokenized with the model folder's tokenizer (or `--tokenizer DIR`).

Each batch is padded to its own longest example (never to an arbitrary length), unless the
model's sequence axis is static, then to that; examples longer than the model takes are
truncated. The batches go to graphopt.calibration as a list: the first half fits, the second
half is held out and is what fidelity is measured on. Not built: image folders
(`--calib-images`) and streaming with a bounded number of activations held.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import InputError
from graphopt.model import Model

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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
