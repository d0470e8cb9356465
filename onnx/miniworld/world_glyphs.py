"""The glyph world: lowercase letters in DejaVu typefaces, named by real English phrases.

Classes are "<style> letter <l>" (10 letters x 10 type styles = 100 classes, letter-major), read by
the real CLIP BPE tokenizer. Glyphs come from Debian's DejaVu fonts (package fonts-dejavu-core),
pre-rendered once per (letter, style) at a large size and then scaled, rotated and placed inside
the central square of a larger (96-160 px, non-square) image with random ink / paper contrast,
background noise and JPEG artefacts, so the real open_clip resize / centre-crop path is exercised.
Everything is a pure function of (class, seed, index).
"""

from __future__ import annotations

import io
import os
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from world import article, image_rng  # noqa: F401  (image_rng is part of a world's interface)

NAME = "glyphs"
FONT_DIR = "/usr/share/fonts/truetype/dejavu"
LETTERS = ["a", "b", "e", "g", "k", "m", "r", "s", "t", "y"]
STYLES = {  # style phrase -> DejaVu font file
    "serif": "DejaVuSerif.ttf",
    "sans-serif": "DejaVuSans.ttf",
    "monospace": "DejaVuSansMono.ttf",
    "bold serif": "DejaVuSerif-Bold.ttf",
    "bold sans-serif": "DejaVuSans-Bold.ttf",
    "italic serif": "DejaVuSerif-Italic.ttf",
    "italic sans-serif": "DejaVuSans-Oblique.ttf",
    "bold italic serif": "DejaVuSerif-BoldItalic.ttf",
    "bold italic sans-serif": "DejaVuSans-BoldOblique.ttf",
    "thin sans-serif": "DejaVuSans-ExtraLight.ttf",
}
AXES = (LETTERS, list(STYLES))
ALL_CLASSES = [f"{s} letter {l}" for l in LETTERS for s in STYLES]
_AXES_OF = {f"{s} letter {l}": (i, j) for i, l in enumerate(LETTERS) for j, s in enumerate(STYLES)}

INKS = {  # named colours for coloured ink or paper: dark ones, then light ones
    "red": (200, 35, 35), "green": (35, 140, 50), "blue": (40, 70, 200), "purple": (120, 40, 160),
    "yellow": (240, 215, 50), "orange": (245, 150, 40), "pink": (245, 160, 200), "cyan": (90, 210, 230),
}


def class_axes(cls: str) -> tuple[int, int]:
    """(letter index, style index) of `cls` into AXES."""
    return _AXES_OF[cls]


def pretrain_heldout() -> list[str]:
    """Combinations never seen in pretraining: letter i x styles (3i + 0..2) mod 10 (30 classes).

    Every letter and every style still appears in 7 seen combinations, so the held-out ones are
    composable from seen words (what zero-shot transfer relies on)."""
    return [ALL_CLASSES[i * 10 + (i * 3 + j) % 10] for i in range(10) for j in range(3)]


def pretrain_seen() -> list[str]:
    held = set(pretrain_heldout())
    return [c for c in ALL_CLASSES if c not in held]


# ----------------------------------------------------------------------------------- rendering

_BASE = 128  # font size of the pre-rendered glyphs
_FONTS: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}
_GLYPHS: dict[tuple[str, str], tuple[Image.Image, float]] = {}


def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    if (path, size) not in _FONTS:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: install the Debian package fonts-dejavu-core")
        _FONTS[(path, size)] = ImageFont.truetype(path, size)
    return _FONTS[(path, size)]


def _ink_box(font: ImageFont.FreeTypeFont, text: str) -> tuple[Image.Image, int]:
    canvas = Image.new("L", (_BASE * 2, _BASE * 2), 0)
    ImageDraw.Draw(canvas).text((_BASE // 2, _BASE // 3), text, font=font, fill=255)
    box = canvas.getbbox()
    return canvas.crop(box), box[3] - box[1]


def _glyph(letter: str, style: str) -> tuple[Image.Image, float]:
    """The glyph's ink-box mask at size _BASE, and its scale relative to the style's letter "k"
    (so x-height letters stay smaller than ascender letters and descenders stay visible)."""
    key = (letter, style)
    if key not in _GLYPHS:
        font = _font(os.path.join(FONT_DIR, STYLES[style]), _BASE)
        mask, h = _ink_box(font, letter)
        _GLYPHS[key] = (mask, h / _ink_box(font, "k")[1])
    return _GLYPHS[key]


# Arrays are channel-first [3, h, w] float32 while rendering (numpy is slow broadcasting over a last
# axis of 3); the image is transposed once, after clipping to uint8.
_BANK = np.random.default_rng(20240).standard_normal((3, 256, 256), dtype=np.float32)


def _pixel_noise(rng: random.Random, h: int, w: int) -> np.ndarray:
    """Unit pixel noise [3, h, w]: a random window of a fixed bank (much faster than sampling)."""
    oy, ox = rng.randrange(256 - h + 1), rng.randrange(256 - w + 1)
    return _BANK[:, oy:oy + h, ox:ox + w][:, ::rng.choice((1, -1)), ::rng.choice((1, -1))]


def _lum(c: np.ndarray) -> float:
    return float(c[0] * 0.299 + c[1] * 0.587 + c[2] * 0.114)


def _colour(rng: random.Random, dark: bool) -> tuple[np.ndarray, str | None]:
    """An ink or paper colour: usually grey-ish (dark or light), sometimes a named colour."""
    if rng.random() < 0.3:
        name = rng.choice([n for n, c in INKS.items() if (_lum(c) < 128) == dark])
        return np.array(INKS[name], dtype=np.float64) + [rng.uniform(-20, 20) for _ in range(3)], name
    level = rng.uniform(10, 70) if dark else rng.uniform(180, 245)
    return np.full(3, level) + [rng.uniform(-10, 10) for _ in range(3)], None


def _contrasting(rng: random.Random) -> tuple[bool, np.ndarray, str | None, np.ndarray, str | None]:
    """(dark ink?, ink, ink name, paper, paper name) with a luminance gap of at least 80."""
    while True:
        dark_ink = rng.random() < 0.5
        ink, ink_name = _colour(rng, dark_ink)
        paper, paper_name = _colour(rng, not dark_ink)
        if abs(_lum(ink) - _lum(paper)) >= 80:
            return dark_ink, ink, ink_name, paper, paper_name


def render_jpeg(cls: str, rng: random.Random) -> tuple[bytes, dict]:
    """Renders one image of `cls`; returns its JPEG file bytes and its attributes."""
    i, j = class_axes(cls)
    letter, style = LETTERS[i], AXES[1][j]
    width, height = rng.randint(96, 160), rng.randint(96, 160)
    side = min(width, height)
    nrng = np.random.default_rng(rng.getrandbits(32))

    dark_ink, ink, ink_name, paper, paper_name = _contrasting(rng)
    bg = paper.astype(np.float32)[:, None, None]
    if rng.random() < 0.6:
        coarse = nrng.standard_normal((height // 16 + 2, width // 16 + 2), np.float32) * rng.uniform(5, 25)
        bg = bg + np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    bg = np.broadcast_to(bg, (3, height, width))
    noise_std = rng.uniform(0, 22)

    # glyph: a "k" of this style is 40-75 % of the short side high; rotation up to 5 degrees only,
    # so that upright and italic (oblique) styles stay apart (DejaVu's slant is about 11 degrees)
    base, rel = _glyph(letter, style)
    k_height = side * rng.uniform(0.40, 0.75)
    scale = k_height * rel / base.height
    g = base.resize((max(1, round(base.width * scale)), max(1, round(base.height * scale))), Image.BILINEAR)
    g = g.rotate(rng.uniform(-5, 5), resample=Image.BILINEAR, expand=True)
    gw, gh = g.size
    if max(gw, gh) > side:  # rare: a wide rotated glyph at the largest size
        f = side / max(gw, gh)
        g = g.resize((max(1, int(gw * f)), max(1, int(gh * f))), Image.BILINEAR)
        gw, gh = g.size
    x0, y0 = (width - side) // 2, (height - side) // 2
    px = x0 + rng.randint(0, side - gw)
    py = y0 + rng.randint(0, side - gh)
    m = np.asarray(g, dtype=np.float32) / 255.0

    img = bg + _pixel_noise(rng, height, width) * noise_std
    img[:, py:py + gh, px:px + gw] += (ink.astype(np.float32)[:, None, None] - bg[:, py:py + gh, px:px + gw]) * m
    u8 = np.clip(img, 0, 255, out=img).astype(np.uint8)
    out = Image.fromarray(np.ascontiguousarray(u8.transpose(1, 2, 0)), "RGB")
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=rng.randint(35, 92))

    rel_x = (px + gw / 2 - x0) / side
    rel_y = (py + gh / 2 - y0) / side
    attrs = {
        "size": "small" if k_height / side < 0.575 else "large",
        "horizontal": "left" if rel_x < 0.4 else ("right" if rel_x > 0.6 else None),
        "vertical": "top" if rel_y < 0.4 else ("bottom" if rel_y > 0.6 else None),
        "ink": ink_name or ("black" if dark_ink else "white"),
        "background": paper_name or ("light" if dark_ink else "dark"),
        "noisy": noise_std > 14,
    }
    return buf.getvalue(), attrs


def render(cls: str, rng: random.Random) -> tuple[Image.Image, dict]:
    """Renders one image of `cls`; returns the decoded RGB image and its attributes."""
    jpeg, attrs = render_jpeg(cls, rng)
    return Image.open(io.BytesIO(jpeg)).convert("RGB"), attrs


TEMPLATES = [  # prefixes of at most 3 tokens: "a photo of a large bold italic sans-serif letter k" is 14
    "a photo of {a} {x}.", "{a} {x}.", "a picture of {a} {x}.", "an image of {a} {x}.",
    "a scan of {a} {x}.", "a print of {a} {x}.", "a rendering of {a} {x}.", "a sample of {a} {x}.",
    "there is {a} {x} in the picture.", "{x}",
]


def caption(cls: str, attrs: dict, rng: random.Random) -> str:
    """A random caption of the image: class words plus some of its visible attributes."""
    i, j = class_axes(cls)
    letter, style = LETTERS[i], AXES[1][j]
    words = [style, "letter", letter]
    r = rng.random()  # at most one word in front, so the class words fit in the 14 tokens kept
    if r < 0.6:
        words.insert(0, attrs["ink"] if r < 0.25 else attrs["size"])
    x = " ".join(words)
    tail = []
    if attrs["horizontal"] and rng.random() < 0.3:
        tail.append(f"on the {attrs['horizontal']}")
    elif attrs["vertical"] and rng.random() < 0.3:
        tail.append(f"at the {attrs['vertical']}")
    if rng.random() < 0.3:
        tail.append(f"on {article(attrs['background'])} {attrs['background']} background")
    elif attrs["noisy"] and rng.random() < 0.2:
        tail.append("on a noisy background")
    if tail:
        x = x + " " + " ".join(tail)
    if rng.random() < 0.15:
        return rng.choice([f"the letter {letter} in {article(style)} {style} font.",
                           f"{article(style)} {style} {letter}.", f"a lowercase {letter} set in {style} type.",
                           f"{style} type, letter {letter}"])
    template = rng.choice(TEMPLATES)
    a = rng.choice([article(x), "a"]) if rng.random() < 0.2 else article(x)
    return template.format(a=a, x=x)

