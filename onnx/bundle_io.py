"""Bundle helpers shared by onnx/export.py and onnx/quantize.py (docs/FORMATS.md section 1).

The manifest is written by hand (`render_manifest`, checked by reading it back with tomllib), every
file is hashed with `sha256_file`, and images go through open_clip's eval transform with the
bundle's own preprocessing parameters (`load_pixels`). One copy of each, so a bundle written by
export.py and one updated by quantize.py cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tomllib
from pathlib import Path

import open_clip
import torch
from PIL import Image

BUNDLE_FORMAT = "cac-edge-bundle"
# Version 1: one image encoder per model. Version 2: the same plus optional precision variants of
# the image encoders (`image_encoder_int8`, the informative `[quantization]` table). A bundle is
# written as version 1 whenever it has no variant, so version-1 readers keep reading it.
BUNDLE_FORMAT_VERSION = 1
BUNDLE_FORMAT_VERSION_VARIANTS = 2

IMAGE_FILE = "image_zs.onnx"
IMAGE_INT8_FILE = "image_zs.int8.onnx"
IMAGE_FT_FILE = "image_ft.onnx"  # MaPLe/PromptSRC: the image encoder with deep vision prompts
TEXT_ZS_FILE = "text_zs.onnx"
TEXT_FT_FILE = "text_ft.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "bundle.toml"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


class ExportError(Exception):
    """A problem the user can fix; the message says how."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ExportError(f"cannot write the non-finite number {value} to {MANIFEST_FILE}")
        return repr(value)  # shortest round-trip form, always with '.' or 'e'
    if isinstance(value, str):
        # JSON escapes are valid TOML basic-string escapes; TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def render_manifest(manifest: dict, header_comments: dict[str, str] | None = None) -> str:
    """TOML text: top-level scalars first, then one table per dict (file names quoted as keys).

    `header_comments` maps a table name to a comment kept after its `[table]` header (what
    `table_header_comments` read from the manifest being updated)."""
    header_comments = header_comments or {}
    lines = [f"{key} = {_toml_value(v)}" for key, v in manifest.items() if not isinstance(v, dict)]
    for table, entries in manifest.items():
        if isinstance(entries, dict):
            comment = f"  {header_comments[table]}" if table in header_comments else ""
            lines += ["", f"[{table}]{comment}"]
            lines += [f"{_toml_key(key)} = {_toml_value(v)}" for key, v in entries.items()]
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != manifest:  # the hand-written TOML must read back identically
        raise AssertionError("bundle.toml does not round-trip")
    return text


def table_header_comments(text: str) -> dict[str, str]:
    """`# ...` comments written after `[table]` headers, to carry them through a re-render."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r"\[([A-Za-z0-9_-]+)\]\s*(#.*)", line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside `path`, fsync, rename over it: readers see the old or the new file, never half."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def eval_transform(preprocess: dict):
    """open_clip's eval transform for the bundle's preprocessing parameters."""
    return open_clip.image_transform(
        preprocess["image_size"], is_train=False, mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]), interpolation="bicubic", resize_mode="shortest",
    )


def load_pixels(paths: list[Path], preprocess: dict) -> torch.Tensor:
    transform = eval_transform(preprocess)
    return torch.stack([transform(Image.open(p)) for p in paths])


def image_files(directory: Path, recursive: bool = False) -> list[Path]:
    """The .jpg/.png files of a folder (and its subfolders when `recursive`), sorted."""
    if not directory.is_dir():
        return []
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in directory.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def parity_images(directory: Path, count: int) -> list[Path]:
    paths = image_files(directory)
    if not paths:
        raise ExportError(f"{directory}: no .jpg/.png images for the parity check; pass --parity-images DIR or --no-parity")
    return [paths[i % len(paths)] for i in range(max(count, len(paths)))]
