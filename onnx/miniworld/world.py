"""The mini-world: coloured shapes on noisy backgrounds, named by real English phrases.

Classes are "<colour> <shape>" (10 colours x 10 shapes = 100 classes), read by the real CLIP BPE
tokenizer. Images are rendered larger than the model input (96-160 px, non-square), with random
position, scale, rotation, background noise and JPEG artefacts, so the real open_clip resize /
centre-crop path is exercised. Everything is a pure function of (class, seed, index).
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (210, 35, 35),
    "green": (40, 160, 50),
    "blue": (40, 70, 210),
    "yellow": (235, 215, 40),
    "orange": (240, 130, 20),
    "purple": (130, 40, 170),
    "pink": (245, 140, 190),
    "brown": (120, 70, 30),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
SHAPES = ["circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon", "ring", "arrow"]
ALL_CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]


def pretrain_heldout() -> list[str]:
    """Combinations never seen in pretraining: colour i x shapes (i + 0..2) mod 10 (30 classes).

    Every colour and every shape still appears in 7 seen combinations, so the held-out ones are
    composable from seen words (what zero-shot transfer relies on)."""
    held = []
    colours = list(COLOURS)
    for i, colour in enumerate(colours):
        for j in range(3):
            held.append(f"{colour} {SHAPES[(i * 3 + j) % 10]}")
    return held


def pretrain_seen() -> list[str]:
    held = set(pretrain_heldout())
    return [c for c in ALL_CLASSES if c not in held]


# ----------------------------------------------------------------------------------- rendering

def _shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def poly(pts):
        cs, sn = math.cos(rot), math.sin(rot)
        return [(cx + r * (x * cs - y * sn), cy + r * (x * sn + y * cs)) for x, y in pts]

    if shape == "square":
        return poly([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    if shape == "triangle":
        return poly([(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = 1.0 if k % 2 == 0 else 0.42
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        return poly(pts)
    if shape == "heart":
        pts = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x / 17, y / 17 + 0.1))
        return poly(pts)
    if shape == "cross":
        w = 0.33
        return poly([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
                     (-1, w), (-1, -w), (-w, -w)])
    if shape == "diamond":
        return poly([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)])
    if shape == "hexagon":
        return poly([(math.cos(a), math.sin(a)) for a in [k * math.pi / 3 for k in range(6)]])
    if shape == "arrow":
        return poly([(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)])
    raise ValueError(shape)


def render_jpeg(cls: str, rng: random.Random) -> tuple[bytes, dict]:
    """Renders one image of `cls`; returns its JPEG file bytes and its attributes."""
    colour, shape = cls.split(" ")
    width, height = rng.randint(96, 160), rng.randint(96, 160)
    side = min(width, height)
    nrng = np.random.default_rng(rng.getrandbits(32))

    # background: a near-grey level, optional low-frequency blotches, pixel noise
    level = rng.uniform(70, 185)
    tint = np.array([rng.uniform(-12, 12) for _ in range(3)])
    bg = np.full((height, width, 3), level) + tint
    if rng.random() < 0.6:
        coarse = nrng.normal(0, rng.uniform(5, 25), (height // 16 + 2, width // 16 + 2, 1))
        blot = np.asarray(Image.fromarray(coarse[..., 0].astype(np.float32)).resize((width, height), Image.BILINEAR))
        bg = bg + blot[..., None]
    noise_std = rng.uniform(0, 22)

    # shape inside the central square (what the centre crop keeps)
    r = side * rng.uniform(0.16, 0.36)
    x0, y0 = (width - side) / 2, (height - side) / 2
    margin = r * 1.02
    cx = x0 + rng.uniform(margin, side - margin)
    cy = y0 + rng.uniform(margin, side - margin)
    rot = rng.uniform(0, 2 * math.pi)

    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            ri = r * rng.uniform(0.45, 0.6)
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, rot), fill=255)
    m = np.asarray(mask, dtype=np.float64)[..., None] / 255.0

    base = np.array(COLOURS[colour], dtype=np.float64)
    fg = base + np.array([rng.uniform(-22, 22) for _ in range(3)]) + rng.uniform(-15, 15)
    img = bg * (1 - m) + fg * m
    img = img + nrng.normal(0, noise_std, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)

    out = Image.fromarray(img, "RGB")
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=rng.randint(35, 92))
    jpeg = buf.getvalue()

    rel_x = (cx - x0) / side
    rel_y = (cy - y0) / side
    attrs = {
        "size": "small" if r / side < 0.25 else "large",
        "horizontal": "left" if rel_x < 0.4 else ("right" if rel_x > 0.6 else None),
        "vertical": "top" if rel_y < 0.4 else ("bottom" if rel_y > 0.6 else None),
        "background": "dark" if level < 110 else ("light" if level > 150 else None),
        "noisy": noise_std > 14,
    }
    return jpeg, attrs


def render(cls: str, rng: random.Random) -> tuple[Image.Image, dict]:
    """Renders one image of `cls`; returns the decoded RGB image and its attributes."""
    jpeg, attrs = render_jpeg(cls, rng)
    return Image.open(io.BytesIO(jpeg)).convert("RGB"), attrs


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


TEMPLATES = [
    "a photo of {a} {x}.",
    "{a} {x}.",
    "a picture of {a} {x}.",
    "an image of {a} {x}.",
    "a drawing of {a} {x}.",
    "a rendering of {a} {x}.",
    "a close-up photo of {a} {x}.",
    "a jpeg photo of {a} {x}.",
    "there is {a} {x} in the picture.",
    "{x}",
]


def caption(cls: str, attrs: dict, rng: random.Random) -> str:
    """A random caption of the image: class words plus some of its visible attributes."""
    colour, shape = cls.split(" ")
    words = [colour, shape]
    if rng.random() < 0.5:
        words.insert(0, attrs["size"])
    x = " ".join(words)
    tail = []
    if attrs["horizontal"] and rng.random() < 0.4:
        tail.append(f"on the {attrs['horizontal']}")
    elif attrs["vertical"] and rng.random() < 0.4:
        tail.append(f"at the {attrs['vertical']}")
    if attrs["background"] and rng.random() < 0.4:
        tail.append(f"on a {attrs['background']} background")
    elif attrs["noisy"] and rng.random() < 0.3:
        tail.append("on a noisy background")
    if tail:
        x = x + " " + " ".join(tail)
    if rng.random() < 0.1:
        x = f"{shape} that is {colour}" if rng.random() < 0.5 else f"{colour} coloured {shape}"
    template = rng.choice(TEMPLATES)
    a = rng.choice([article(x), "a"]) if rng.random() < 0.2 else article(x)
    return template.format(a=a, x=x)


def image_rng(seed: int, cls: str, index: int, stream: str) -> random.Random:
    return random.Random(f"{seed}/{stream}/{cls}/{index}")
