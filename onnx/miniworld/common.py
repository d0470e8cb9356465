"""Shared pieces of the mini-world study: model config, rendering to arrays, preprocessing."""

from __future__ import annotations

import importlib
import json
import os
import random
from multiprocessing import Pool

import numpy as np
import open_clip
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.environ.get("MINIWORLD_WORK", os.path.join(HERE, "work"))
# The world (a module with ALL_CLASSES, pretrain_seen/heldout, render, caption) and the model
# config are chosen per process: the demo uses the defaults, onnx/miniworld/evidence.py sets
# MINIWORLD_WORLD / MINIWORLD_MODEL_CONFIG before importing this module (workers inherit them).
world = importlib.import_module(os.environ.get("MINIWORLD_WORLD", "world"))
MODEL_NAME = "miniworld-tiny-clip"
CONFIG_PATH = os.environ.get("MINIWORLD_MODEL_CONFIG", os.path.join(HERE, f"{MODEL_NAME}.json"))
with open(CONFIG_PATH) as _f:
    _CONFIG = json.load(_f)
IMAGE_SIZE = _CONFIG["vision_cfg"]["image_size"]
CONTEXT_LENGTH = _CONFIG["text_cfg"]["context_length"]
MEAN = np.array(open_clip.OPENAI_DATASET_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array(open_clip.OPENAI_DATASET_STD, dtype=np.float32).reshape(1, 3, 1, 1)


def model_config() -> dict:
    with open(CONFIG_PATH) as f:
        return json.load(f)


def build_model(init_logit_scale: float | None = None) -> open_clip.CLIP:
    cfg = model_config()
    kwargs = {}
    if init_logit_scale is not None:
        kwargs["init_logit_scale"] = init_logit_scale
    return open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"], **kwargs)


def tokenize(texts: list[str]) -> torch.Tensor:
    return open_clip.tokenize(texts, context_length=CONTEXT_LENGTH)


_TRANSFORM = None


def eval_transform():
    """open_clip's own eval transform (Resize shorter side bicubic+antialias, CentreCrop,
    ToTensor, Normalize): the path the runtime reproduces."""
    global _TRANSFORM
    if _TRANSFORM is None:
        _TRANSFORM = open_clip.image_transform(IMAGE_SIZE, is_train=False)
    return _TRANSFORM


def preprocess_uint8(img: Image.Image) -> np.ndarray:
    """Resize + centre crop of open_clip's eval transform, kept as uint8 [3, S, S] (ToTensor and
    Normalize are applied later by `to_pixel_values`, which is the same arithmetic)."""
    t = eval_transform()
    for step in t.transforms:
        name = type(step).__name__
        if "ToTensor" in name or name == "Normalize":
            continue
        img = step(img)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    assert arr.shape == (IMAGE_SIZE, IMAGE_SIZE, 3), arr.shape
    return arr.transpose(2, 0, 1).copy()


def to_pixel_values(u8: np.ndarray) -> np.ndarray:
    return ((u8.astype(np.float32) / 255.0) - MEAN) / STD


def _render_one(job):
    seed, cls, index, stream = job
    img, attrs = world.render(cls, world.image_rng(seed, cls, index, stream))
    return preprocess_uint8(img), attrs


def render_set(classes: list[str], per_class: int, seed: int, stream: str, workers: int = 2):
    """Renders `per_class` images of every class; returns (uint8 [N,3,S,S], labels, attrs)."""
    jobs = [(seed, c, i, stream) for c in classes for i in range(per_class)]
    labels = np.array([ci for ci, _ in enumerate(classes) for _ in range(per_class)], dtype=np.int64)
    with Pool(workers) as pool:
        out = pool.map(_render_one, jobs, chunksize=64)
    return np.stack([o[0] for o in out]), labels, [o[1] for o in out]


def class_split(key: str, n_base: int, n_valnew: int, n_testnew: int):
    """One class split of the current world, a pure function of `key`: base classes drawn from
    the pretraining-seen ones, validation-new and test-new (disjoint) from the held-out ones, each
    in ALL_CLASSES order."""
    rng = random.Random(key)
    seen, held = world.pretrain_seen(), world.pretrain_heldout()
    rng.shuffle(seen)
    rng.shuffle(held)
    order = {c: i for i, c in enumerate(world.ALL_CLASSES)}
    srt = lambda xs: sorted(xs, key=order.get)  # noqa: E731
    return srt(seen[:n_base]), srt(held[:n_valnew]), srt(held[n_valnew:n_valnew + n_testnew])


def render_evaluation_sets(shots: int, val: int, test: int) -> dict:
    """The evaluation images of every class of the current world (seed 1): {"shots", "val",
    "test"} -> (pixel values [N,3,S,S], labels indexing ALL_CLASSES)."""
    sets = {}
    for stream, per in (("shots", shots), ("val", val), ("test", test)):
        u8, lab, _ = render_set(world.ALL_CLASSES, per, 1, stream)
        sets[stream] = (to_pixel_values(u8), lab)
    return sets
