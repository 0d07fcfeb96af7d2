"""Issue 30's image acceptance, as a user runs it: a trained image-classification folder and a
folder of images to calibrate on, to an int8 model for this CPU, then its test accuracy.

    .venv/bin/python examples/digits_folder.py [--steps 600] [--out /tmp/digits]

It trains the transformers ViT of examples/task_mixers.py on scikit-learn's digits (16x16, one
channel, seeded), saves it with save_pretrained, writes the 1400 training digits as PNGs in one
folder per class and the 397 test digits beside them, runs
    graphopt optimize OUT/vit -o OUT/vit.int8.onnx --calib-images OUT/train --image-size 16x16 \\
        --mean 0 --std 1 --precision int8 --fidelity 0.99
and prints the accuracy of the folder's model (torch) and of the output (graphopt.session) on
the test PNGs, with the CPU model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import task_mixers  # noqa: E402

import graphopt  # noqa: E402
from graphopt import machine  # noqa: E402


def write_pngs(folder: Path, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> np.ndarray:
    """The images as 8-bit PNGs in one folder per class; returns them as the PNGs hold them."""
    pixels = np.round(images[index, 0].numpy() * 255).astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, labels[index].tolist())):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(folder / str(label) / f"{i:04d}.png")
    return (pixels.astype(np.float32) / 255)[:, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", type=Path, default=Path("/tmp/digits"))
    args = ap.parse_args()
    print(f"cpu: {machine.cpu_model()}")
    model, images, labels, train, test = task_mixers.train_vit(args.steps)
    model.save_pretrained(args.out / "vit")
    write_pngs(args.out / "train", images, labels, train)
    test_pixels = write_pngs(args.out / "test", images, labels, test)
    out = args.out / "vit.int8.onnx"
    command = ["optimize", str(args.out / "vit"), "-o", str(out), "--calib-images", str(args.out / "train"),
               "--image-size", "16x16", "--mean", "0", "--std", "1", "--precision", "int8", "--fidelity", "0.99"]
    print("$ graphopt", " ".join(command))
    subprocess.run([str(Path(sys.executable).with_name("graphopt")), *command], check=True)
    want = labels[test].numpy()
    with torch.no_grad():
        fp32 = model(pixel_values=torch.as_tensor(test_pixels)).logits.argmax(-1).numpy()
    int8 = graphopt.session(out).run({"pixel_values": test_pixels})["logits"].argmax(-1)
    print(f"test accuracy on {len(want)} PNGs: folder (torch fp32) {100 * (fp32 == want).mean():.2f}%, "
          f"{out.name} {100 * (int8 == want).mean():.2f}% (top-1 agreement {100 * (int8 == fp32).mean():.2f}%)")


if __name__ == "__main__":
    main()
