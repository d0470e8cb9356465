"""Frames for measuring the shift alarm (scripts/drift-alarm): mini-world frames a camera would
see when nothing changed, and the same world after each kind of shift.

    python shift_frames.py --classes onnx/demo/classes.txt --out DIR [--indist 10000] [--shifted 600]

Writes DIR/<kind>/<index:05>.jpg for the kinds
  indist       the demo's classes, rendered as world.py renders them (a seed stream never used
               for training, the demo's images or its evaluation);
  background   the same, on a strongly coloured, striped background (a moved camera, a new wall);
  blur         Gaussian blur, radius 3 (focus lost, a smeared window);
  colour_cast  a warm cast: red x1.25, green x1.0, blue x0.6 (a lamp, white balance gone);
  new_class    classes of the world that are not in the class list (new objects);
  covered      a covered lens: dark frames with sensor noise, no shape.
Needs numpy and Pillow only (not torch).
"""

from __future__ import annotations

import argparse
import io
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from world import ALL_CLASSES, image_rng, render, render_jpeg

STREAM = "drift-alarm"


def read_classes(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def jpeg(image: Image.Image, rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(60, 92))
    return buffer.getvalue()


def striped_background(image: Image.Image, rng: random.Random) -> Image.Image:
    """Replaces the near-grey background by saturated stripes, keeping the shape: pixels close to
    the frame's median colour are background."""
    pixels = np.asarray(image, dtype=np.float64)
    median = np.median(pixels.reshape(-1, 3), axis=0)
    background = np.linalg.norm(pixels - median, axis=2) < 40
    height, width = background.shape
    period = rng.randint(6, 14)
    colours = np.array([[20, 160, 220], [230, 200, 30]], dtype=np.float64)
    rows = (np.arange(height)[:, None] + np.arange(width)[None, :]) // period % 2
    stripes = colours[rows]
    pixels[background] = stripes[background]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def covered(rng: random.Random) -> Image.Image:
    width, height = rng.randint(96, 160), rng.randint(96, 160)
    noise = np.random.default_rng(rng.getrandbits(32))
    level = rng.uniform(3, 20)
    pixels = level + noise.normal(0, rng.uniform(2, 6), (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def frame(kind: str, classes: list[str], unseen: list[str], index: int) -> bytes:
    rng = random.Random(f"{STREAM}/{kind}/{index}")
    if kind == "covered":
        return jpeg(covered(rng), rng)
    pool = unseen if kind == "new_class" else classes
    cls = pool[rng.randrange(len(pool))]
    render_rng = image_rng(7, cls, index, f"{STREAM}/{kind}")
    if kind in ("indist", "new_class"):
        return render_jpeg(cls, render_rng)[0]
    image, _ = render(cls, render_rng)
    if kind == "background":
        image = striped_background(image, rng)
    elif kind == "blur":
        image = image.filter(ImageFilter.GaussianBlur(radius=3))
    elif kind == "colour_cast":
        pixels = np.asarray(image, dtype=np.float64) * np.array([1.25, 1.0, 0.6])
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    else:
        raise ValueError(kind)
    return jpeg(image, rng)


KINDS = ["indist", "background", "blur", "colour_cast", "new_class", "covered"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--indist", type=int, default=10000)
    parser.add_argument("--shifted", type=int, default=600)
    args = parser.parse_args()
    classes = read_classes(args.classes)
    unseen = [cls for cls in ALL_CLASSES if cls not in set(classes)]
    for kind in KINDS:
        folder = args.out / kind
        folder.mkdir(parents=True, exist_ok=True)
        count = args.indist if kind == "indist" else args.shifted
        for index in range(count):
            (folder / f"{index:05}.jpg").write_bytes(frame(kind, classes, unseen, index))
        print(f"{folder}: {count} frames")


if __name__ == "__main__":
    main()
