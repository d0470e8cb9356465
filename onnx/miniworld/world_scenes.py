"""The scene world: object silhouettes on procedural textured backgrounds, named by English phrases.

Classes are "<object> <on / against / in / under> <background>" (10 objects x 10 backgrounds = 100
classes, object-major), read by the real CLIP BPE tokenizer. Objects are filled PIL polygons in a
colour that contrasts with the background; backgrounds are numpy textures, each with its own
palette. Images are rendered larger than the model input (96-160 px, non-square), with random
position, scale, flip, small rotation, pixel noise and JPEG artefacts, so the real open_clip
resize / centre-crop path is exercised. Everything is a pure function of (class, seed, index).
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw

from world import article, image_rng  # noqa: F401  (image_rng is part of a world's interface)

NAME = "scenes"
OBJECTS = ["car", "tree", "house", "boat", "fish", "bird", "cup", "key", "umbrella", "chair"]
BACKGROUNDS = {  # background -> preposition in the class name
    "grass": "on", "sand": "on", "snow": "on", "water": "on", "a brick wall": "against",
    "wooden planks": "on", "a cloudy sky": "in", "an asphalt road": "on", "autumn leaves": "on",
    "a starry sky": "under",
}
AXES = (OBJECTS, list(BACKGROUNDS))
ALL_CLASSES = [f"{o} {p} {b}" for o in OBJECTS for b, p in BACKGROUNDS.items()]
_AXES_OF = {c: divmod(k, 10) for k, c in enumerate(ALL_CLASSES)}
COLOURS = {
    "red": (205, 35, 35), "green": (40, 150, 50), "blue": (40, 70, 210), "yellow": (240, 215, 40),
    "orange": (240, 130, 20), "purple": (130, 40, 170), "pink": (245, 140, 190), "brown": (115, 65, 30),
    "black": (15, 15, 15), "white": (245, 245, 245),
}
_PALETTE = np.array(list(COLOURS.values()), np.float32)


def class_axes(cls: str) -> tuple[int, int]:
    """(object index, background index) of `cls` into AXES."""
    return _AXES_OF[cls]


def pretrain_heldout() -> list[str]:
    """Combinations never seen in pretraining: object i x backgrounds (3i + 0..2) mod 10 (30 classes).

    Every object and every background still appears in 7 seen combinations, so the held-out ones
    are composable from seen words (what zero-shot transfer relies on)."""
    return [ALL_CLASSES[i * 10 + (i * 3 + j) % 10] for i in range(10) for j in range(3)]


def pretrain_seen() -> list[str]:
    held = set(pretrain_heldout())
    return [c for c in ALL_CLASSES if c not in held]


# ----------------------------------------------------------------------------------- silhouettes

def _e(cx, cy, rx, ry):  # ellipse as a polygon
    return [(cx + rx * math.cos(k * math.pi / 10), cy + ry * math.sin(k * math.pi / 10)) for k in range(20)]


def _r(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


_PARTS = {  # object -> [(fill, polygon)] in unit coordinates (y down), drawn in order; fill 0 cuts
    "car": [(1, [(-1, -.05), (.9, -.05), (1, .15), (1, .4), (-1, .4)]),
            (1, [(-.55, -.05), (-.35, -.45), (.3, -.45), (.55, -.05)]), (1, _e(-.55, .42, .22, .22)),
            (1, _e(.55, .42, .22, .22)), (0, [(-.45, -.1), (-.3, -.37), (-.05, -.37), (-.05, -.1)]),
            (0, [(.05, -.1), (.05, -.37), (.25, -.37), (.42, -.1)])],
    "tree": [(1, [(0, -1), (.45, -.35), (-.45, -.35)]), (1, [(0, -.7), (.62, .1), (-.62, .1)]),
             (1, [(0, -.35), (.8, .55), (-.8, .55)]), (1, _r(-.13, .5, .13, 1))],
    "house": [(1, _r(-.7, -.15, .7, .9)), (1, [(-.95, -.1), (0, -.9), (.95, -.1)]), (1, _r(.4, -.8, .6, -.4)),
              (0, _r(-.15, .4, .15, .9)), (0, _r(-.5, .05, -.25, .3)), (0, _r(.25, .05, .5, .3))],
    "boat": [(1, [(-1, .35), (1, .35), (.7, .75), (-.7, .75)]), (1, _r(-.04, -1, .04, .35)),
             (1, [(.1, -.95), (.1, .25), (.8, .25)]), (1, [(-.1, -.75), (-.1, .25), (-.6, .25)])],
    "fish": [(1, _e(-.2, 0, .65, .38)), (1, [(.3, 0), (1, -.5), (.85, 0), (1, .5)]),
             (1, [(-.4, -.3), (0, -.58), (.15, -.3)]), (0, _e(-.58, -.08, .08, .08))],
    "bird": [(1, [(-1, -.5), (-.5, -.6), (0, -.05), (.5, -.6), (1, -.5), (.55, -.25), (0, .3), (-.55, -.25)]),
             (1, _e(0, .12, .16, .3))],
    "cup": [(1, _e(.38, -.05, .38, .32)), (0, _e(.38, -.05, .2, .15)),
            (1, [(-.6, -.55), (.35, -.55), (.3, .45), (.15, .6), (-.45, .6), (-.55, .45)]),
            (1, _e(-.12, .68, .75, .12))],
    "key": [(1, _e(-.62, 0, .38, .38)), (0, _e(-.62, 0, .16, .16)), (1, _r(-.3, -.12, 1, .12)),
            (1, _r(.55, .1, .7, .42)), (1, _r(.8, .1, .95, .32))],
    "umbrella": [(1, [(math.cos(a) * 1.0, math.sin(a) * .75) for a in np.linspace(math.pi, 2 * math.pi, 16)]
                  + [(.75, .12), (.5, 0), (.25, .12), (0, 0), (-.25, .12), (-.5, 0), (-.75, .12)]),
                 (1, _e(.2, .78, .22, .2)), (0, _e(.2, .78, .1, .09)), (0, _r(0, .55, .5, .78)),
                 (1, _r(-.08, 0, .08, .8))],
    "chair": [(1, _r(-.6, -1, -.33, .15)), (1, _r(-.6, -.02, .6, .24)), (1, _r(-.6, .2, -.36, 1)),
              (1, _r(.36, .2, .6, 1))],
}


def _normalised(parts):
    """Centres the object's box on the origin, with its longer side 1 (returns parts, half extents)."""
    pts = np.array([p for f, poly in parts if f for p in poly], dtype=np.float64)
    lo, hi = pts.min(0), pts.max(0)
    c, s = (lo + hi) / 2, (hi - lo).max()
    return [(f, (np.array(poly) - c) / s) for f, poly in parts], (hi - lo) / s / 2


_SHAPES = {o: _normalised(p) for o, p in _PARTS.items()}

# ----------------------------------------------------------------------------------- backgrounds
# Arrays are channel-first [3, h, w] float32 while rendering (numpy is slow broadcasting over a last
# axis of 3); the image is transposed once, after clipping to uint8.

_BANK = np.random.default_rng(20240).standard_normal((3, 256, 256), dtype=np.float32)


def _pixel_noise(rng: random.Random, h: int, w: int) -> np.ndarray:
    """Unit pixel noise [3, h, w]: a random window of a fixed bank (much faster than sampling)."""
    oy, ox = rng.randrange(256 - h + 1), rng.randrange(256 - w + 1)
    return _BANK[:, oy:oy + h, ox:ox + w][:, ::rng.choice((1, -1)), ::rng.choice((1, -1))]


def _field(nrng, h, w, cy, cx):
    """Smooth unit noise [h, w] with correlation lengths about (cy, cx) pixels."""
    coarse = nrng.standard_normal((h // cy + 2, w // cx + 2), dtype=np.float32)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))


def _rgb(c) -> np.ndarray:
    return np.asarray(c, np.float32)[:, None, None]


def _background(bg: str, h: int, w: int, rng: random.Random, nrng) -> np.ndarray:
    y, x = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    tone = rng.uniform(-15, 15)

    def paint(base, f, k):  # base colour + tone + f (a [h, w] texture) times per-channel amplitudes k
        return _rgb(base) + tone + _rgb(k) * f

    if bg == "grass":
        return paint((60, 140, 45), _field(nrng, h, w, 10, 1) + .4 * _field(nrng, h, w, 24, 24), (25, 40, 15))
    if bg == "sand":
        ripple = np.sin(2 * math.pi * (y + 4 * _field(nrng, h, w, 30, 30)) / rng.uniform(7, 12))
        return paint((215, 190, 140), ripple * .5 + .5 * _pixel_noise(rng, h, w)[0], (18, 16, 12))
    if bg == "snow":
        img = paint((236, 240, 250), _field(nrng, h, w, 24, 24), (8, 8, 4))
        return img - _rgb((14, 10, 0)) * _field(nrng, h, w, 40, 40).clip(0, None)
    if bg == "water":
        waves = _field(nrng, h, w, 3, 25) + .5 * np.sin(y / rng.uniform(2, 4) + _field(nrng, h, w, 20, 20))
        return paint((35, 95, 170), waves, (18, 28, 30))
    if bg == "a brick wall":
        bh = rng.randint(9, 15)
        bw, row = bh * 2.3, (y // bh)
        xs = x + (row % 2) * bw / 2 + rng.uniform(0, bw)
        shade = nrng.standard_normal((h // bh + 2, int(w // bw) + 3), np.float32)
        img = paint((165, 65, 45), shade[row.astype(int), (xs // bw).astype(int)], (20, 10, 8))
        img[:, ((y % bh) < 2) | ((xs % bw) < 2)] = _rgb((200, 195, 185))[..., 0] + tone
        return img
    if bg == "wooden planks":
        ph = rng.randint(14, 24)
        grain = .6 * np.sin(y * rng.uniform(1.2, 2) + 3 * _field(nrng, h, w, 4, 30))
        plank = nrng.standard_normal((h // ph + 2, 1), np.float32)[y.astype(int) // ph, 0]  # [h, 1]
        img = paint((150, 100, 55), grain + .8 * plank, (22, 16, 10))
        img[:, (y[:, 0] % ph) < 2] *= .45
        return img
    if bg == "a cloudy sky":
        cloud = (_field(nrng, h, w, 22, 30) + .5 * _field(nrng, h, w, 8, 8) - rng.uniform(.1, .6)).clip(0, 1)
        return paint((80, 140, 225), y / h * 2 - 1, (-20, -15, -8)) * (1 - cloud) + 245 * cloud
    if bg == "an asphalt road":
        img = paint((72, 72, 75), _pixel_noise(rng, h, w)[0] + .5 * _field(nrng, h, w, 20, 20), (12, 12, 12))
        if rng.random() < 0.7:
            c = (240, 240, 235) if rng.random() < 0.5 else (235, 200, 40)
            across, pos, dash = rng.random() < 0.5, rng.uniform(0.2, 0.8), rng.randint(10, 20)
            a, b = (y, x) if across else (x, y)
            img[:, (np.abs(a - pos * a.max()) < 2.5) & ((b // dash) % 2 == 0)] = _rgb(c)[..., 0]
        return img
    if bg == "autumn leaves":
        img = Image.new("RGB", (w // 2, h // 2), (round(120 + tone), 65, 28))  # drawn at half size
        draw = ImageDraw.Draw(img)
        leaf = [(200, 90, 30), (215, 140, 40), (175, 55, 30), (150, 90, 40), (220, 170, 60)]
        for _ in range(h * w // 480):
            cx, cy, r = rng.uniform(0, w / 2), rng.uniform(0, h / 2), rng.uniform(2, 4.5)
            draw.ellipse([cx - r, cy - r * .6, cx + r, cy + r * .6], fill=rng.choice(leaf))
        return np.asarray(img.resize((w, h), Image.BILINEAR), np.float32).transpose(2, 0, 1)
    if bg == "a starry sky":
        img = paint((12, 16, 45), y / h + .3 * _field(nrng, h, w, 30, 30), (10, 10, 22))
        for _ in range(h * w // 350):
            sx, sy, s = rng.randrange(w), rng.randrange(h), rng.choice([1, 1, 2])
            img[:, sy:sy + s + 1, sx:sx + s + 1] = rng.uniform(170, 255)
        return img
    raise ValueError(bg)


# ----------------------------------------------------------------------------------- rendering

def render_jpeg(cls: str, rng: random.Random) -> tuple[bytes, dict]:
    """Renders one image of `cls`; returns its JPEG file bytes and its attributes."""
    i, j = class_axes(cls)
    obj, bg_name = OBJECTS[i], AXES[1][j]
    width, height = rng.randint(96, 160), rng.randint(96, 160)
    side = min(width, height)
    nrng = np.random.default_rng(rng.getrandbits(32))
    bg = np.broadcast_to(_background(bg_name, height, width, rng, nrng), (3, height, width))
    noise_std = rng.uniform(0, 15)

    # object colour: a named colour that (almost) no background pixel is close to
    near = (np.abs(bg[:, ::7, ::7].reshape(3, -1).T[:, None] - _PALETTE).sum(-1) < 180).mean(0)
    colour = rng.choice([n for n, f in zip(COLOURS, near) if f < 0.03] or ["black", "white"])
    fg = np.array(COLOURS[colour], np.float32) + [rng.uniform(-18, 18) for _ in range(3)]

    # object: longer side 25-45 % of the short side, inside the central square
    parts, half = _SHAPES[obj]
    s = side * rng.uniform(0.25, 0.45)
    flip = rng.random() < 0.5
    rot = math.radians(rng.uniform(-10, 10))
    cs, sn = math.cos(rot), math.sin(rot)
    ex, ey = s * (half[0] * abs(cs) + half[1] * abs(sn)), s * (half[0] * abs(sn) + half[1] * abs(cs))
    x0, y0 = (width - side) / 2, (height - side) / 2
    cx, cy = x0 + rng.uniform(ex, side - ex), y0 + rng.uniform(ey, side - ey)
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for fill, poly in parts:
        px = -poly[:, 0] if flip else poly[:, 0]
        pts = np.stack([cx + s * (px * cs - poly[:, 1] * sn), cy + s * (px * sn + poly[:, 1] * cs)], 1)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255 * fill)
    l, t, r, b = mask.getbbox() or (0, 0, 1, 1)
    m = np.asarray(mask.crop((l, t, r, b)), dtype=np.float32) / 255.0

    img = bg + _pixel_noise(rng, height, width) * noise_std
    img[:, t:b, l:r] += (_rgb(fg) - bg[:, t:b, l:r]) * m
    u8 = np.clip(img, 0, 255, out=img).astype(np.uint8)
    out = Image.fromarray(np.ascontiguousarray(u8.transpose(1, 2, 0)), "RGB")
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=rng.randint(35, 92))

    rel_x, rel_y = (cx - x0) / side, (cy - y0) / side
    attrs = {
        "size": "small" if s / side < 0.35 else "large",
        "horizontal": "left" if rel_x < 0.4 else ("right" if rel_x > 0.6 else None),
        "vertical": "top" if rel_y < 0.4 else ("bottom" if rel_y > 0.6 else None),
        "colour": colour,
        "flipped": flip,
        "noisy": noise_std > 10,
    }
    return buf.getvalue(), attrs


def render(cls: str, rng: random.Random) -> tuple[Image.Image, dict]:
    """Renders one image of `cls`; returns the decoded RGB image and its attributes."""
    jpeg, attrs = render_jpeg(cls, rng)
    return Image.open(io.BytesIO(jpeg)).convert("RGB"), attrs


TEMPLATES = [
    "a photo of {a} {x}.", "{a} {x}.", "a picture of {a} {x}.", "an image of {a} {x}.",
    "a drawing of {a} {x}.", "a rendering of {a} {x}.", "a close-up photo of {a} {x}.",
    "a jpeg photo of {a} {x}.", "there is {a} {x} in the picture.", "{x}",
]


def caption(cls: str, attrs: dict, rng: random.Random) -> str:
    """A random caption of the image: class words plus some of its visible attributes."""
    i, j = class_axes(cls)
    obj, bg = OBJECTS[i], AXES[1][j]
    words = [obj]
    if rng.random() < 0.4:
        words.insert(0, attrs["colour"])
    if rng.random() < 0.3:
        words.insert(0, attrs["size"])
    x = " ".join(words) + f" {BACKGROUNDS[bg]} {bg}"
    if attrs["horizontal"] and rng.random() < 0.2:
        x += f", on the {attrs['horizontal']}"
    elif attrs["vertical"] and rng.random() < 0.2:
        x += f", at the {attrs['vertical']}"
    if rng.random() < 0.1:
        return rng.choice([f"{bg} with {article(words[0])} {' '.join(words)}.", f"{article(obj)} {obj} and {bg}.",
                           f"{bg}, {article(obj)} {obj}"])
    template = rng.choice(TEMPLATES)
    a = rng.choice([article(x), "a"]) if rng.random() < 0.2 else article(x)
    return template.format(a=a, x=x)

