#!/usr/bin/env python3
"""The reference Python pipeline: what cac-edge does, written the way one would in Python.

onnxruntime + PIL + numpy (+ safetensors' numpy loader for the cache file cac-edge uses), with
the same steps and formulas as cac-edge:

  decode      PIL Image.open(path).convert("RGB")   (converted first, as CoOp/Dassl loaders do)
  preprocess  open_clip / torchvision eval: shorter side -> S (bicubic, int() truncation of the
              long side; an image already that size is left untouched), centre crop with
              int(round((len - S) / 2)), /255, normalise with the bundle's mean/std, CHW float32
  encode      onnxruntime InferenceSession on image_zs.onnx (and image_ft.onnx if the bundle has
              one), rows L2-normalised
  logits      scale * f @ [T_zs; T_ft]^T, one fused product against the cache's text_features
              [2, C, D] (docs/FORMATS.md section 3)
  calibrate   docs/CALIBRATION.md / src/calibrate.rs: p = softmax(w * l_ft) in float64, w = 1 (none),
              1/T (ts), r(argmax) (dac), alpha * exp(-d/k) with the logit or probability contrast and
              optional lambda thresholds (cac); vectorised over the batch
  decide      accept when the calibrated confidence >= threshold; top-k by descending logit,
              ties by index

The calibration in force is resolved like cac-edge's: --calibration / --temperature, else the
bundle's [calibration] table (not mixed in when the method or distance differs), else CAC with the
paper's defaults. The threshold: --threshold, else the cache's stored one if it was chosen for this
exact calibration, else 0.8.

Modes:
  classify  one JSON line per image on stdout (flushed): path, label, confidence, ... (the fields
            cac-edge classify prints), used to check agreement and to time the cold start
  bench     the measurements cac-edge bench makes (encoder alone on a ready tensor, the full
            pipeline with calibration none and cac per batch and streaming over all images, and the
            non-encoder stages alone) at each batch size, rounds round-robin with warm-up; JSON on
            stdout with cac-edge bench's field names

    onnx/.venv/bin/python onnx/bench/reference_pipeline.py classify --bundle onnx/demo \\
        --cache calibration-cache/miniworld-demo.safetensors onnx/demo/images/base/red_heart/00.jpg
    onnx/.venv/bin/python onnx/bench/reference_pipeline.py bench --bundle onnx/demo \\
        --cache calibration-cache/miniworld-demo.safetensors --batch-sizes 1,32 onnx/demo/images

--threads sets onnxruntime's intra-op thread count (pass the same to cac-edge); without it
onnxruntime's default is used, as in cac-edge. numpy's BLAS runs on one thread unless
OPENBLAS_NUM_THREADS (or MKL_NUM_THREADS) is set: its spinning worker threads would otherwise
steal the cores from onnxruntime between images (twice the per-image time at batch 1 on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import tomllib
from pathlib import Path

# numpy's BLAS on one thread (unless the caller says otherwise): the logit product is tiny, and
# OpenBLAS's worker threads keep spinning after it, taking the cores from ONNX Runtime's next run:
# measured on 2 cores with ViT-B-32 at batch 1, 115-129 ms per image instead of 64-70 ms.
for _variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402  (after the thread settings, which numpy reads when it loads)
import onnxruntime as ort  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".jfif"}
CAC_PAPER_ALPHA = 1.10
CAC_PAPER_K = 15.0
CAC_PROBS_DEFAULT_K = 2.0
DEFAULT_THRESHOLD = 0.8
DEFAULT_TS_TEMPERATURE = 1.5  # as cac-edge bench: only used for timing when the cache has none


# ------------------------------------------------------------------------------------- settings


def resolve_calibration(requested: dict, bundle: dict, stored_temperature: float | None) -> dict:
    """cac-edge's CalibrationSettings::resolve; returns the calibration as cac-edge serialises it."""

    def differs(key):
        return requested.get(key) is not None and bundle.get(key) is not None and requested[key] != bundle[key]

    keys = ("method", "alpha", "k", "distance", "lambda1", "lambda2", "temperature")
    if differs("method") or differs("distance"):
        merged = {key: requested.get(key) for key in keys}
    else:
        merged = {key: requested.get(key) if requested.get(key) is not None else bundle.get(key) for key in keys}
    method = merged["method"] or "cac"
    if method == "none":
        return {"method": "none"}
    if method == "dac":
        return {"method": "dac"}
    if method == "ts":
        temperature = merged["temperature"] if merged["temperature"] is not None else stored_temperature
        if temperature is None:
            raise SystemExit("calibration ts needs a temperature: pass --temperature")
        return {"method": "ts", "temperature": float(temperature)}
    if method != "cac":
        raise SystemExit(f"unknown calibration method {method!r}")
    distance = merged["distance"] or "logits"
    default_k = CAC_PAPER_K if distance == "logits" else CAC_PROBS_DEFAULT_K
    low, high = merged["lambda1"], merged["lambda2"]
    thresholds = [float(low), float(high)] if low is not None and high is not None else None
    return {
        "method": "cac",
        "alpha": float(merged["alpha"] if merged["alpha"] is not None else CAC_PAPER_ALPHA),
        "k": float(merged["k"] if merged["k"] is not None else default_k),
        "distance": distance,
        "thresholds": thresholds,
    }


# ------------------------------------------------------------------------------------- pipeline


class ReferencePipeline:
    def __init__(self, bundle_dir, cache_path, *, threads=None, calibration=None, temperature=None,
                 threshold=None, top_k=3, precision="fp32"):
        bundle_dir = Path(bundle_dir)
        with open(bundle_dir / "bundle.toml", "rb") as handle:
            manifest = tomllib.load(handle)
        pre = manifest["preprocess"]
        self.size = int(pre["image_size"])
        self.mean = np.asarray(pre["mean"], dtype=np.float32).reshape(1, 1, 3)
        self.std = np.asarray(pre["std"], dtype=np.float32).reshape(1, 1, 3)
        self.top_k = top_k

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        # docs/FORMATS.md §1: the int8 variant of each image encoder is `image_encoder_int8`.
        key = "image_encoder" if precision == "fp32" else f"image_encoder_{precision}"
        encoders = [manifest["zero_shot"][key]]
        if manifest["fine_tuned"].get("image_encoder"):
            encoders.append(manifest["fine_tuned"][key])
        self.sessions = [ort.InferenceSession(str(bundle_dir / name), options, providers=providers) for name in encoders]

        with safe_open(str(cache_path), "np") as cache:
            metadata = cache.metadata() or {}
            text = cache.get_tensor("text_features")  # [2, C, D]
            self.dac = cache.get_tensor("dac_factors").astype(np.float64)
            self.is_base = cache.get_tensor("is_base").astype(bool)
            self.names = bytes(cache.get_tensor("class_names")).decode("utf-8").split("\n")
        self.classes = text.shape[1]
        self.text_stacked = np.ascontiguousarray(text.reshape(2 * self.classes, text.shape[2]))
        self.text_zs, self.text_ft = text[0], text[1]
        self.scale_zs = np.float32(metadata["logit_scale_zs"])
        self.scale_ft = np.float32(metadata["logit_scale_ft"])
        stored_temperature = float(metadata["ts_temperature"]) if "ts_temperature" in metadata else None
        self.stored_temperature = stored_temperature
        requested = {"method": calibration, "temperature": temperature}
        self.bundle_calibration = manifest.get("calibration", {})
        self.calibration = resolve_calibration(requested, self.bundle_calibration, stored_temperature)
        self.threshold = resolve_threshold(threshold, metadata, self.calibration)

    # -- stages
    def decode(self, path):
        with Image.open(path) as image:
            return image.convert("RGB")

    def preprocess_into(self, image, out):
        """open_clip eval transform of one RGB PIL image into out[3, S, S]."""
        size = self.size
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)
        new_width, new_height = (size, new_long) if width <= height else (new_long, size)
        if (new_width, new_height) != (width, height):
            image = image.resize((new_width, new_height), Image.BICUBIC)
        left = int(round((new_width - size) / 2.0))
        top = int(round((new_height - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        out[...] = ((pixels - self.mean) / self.std).transpose(2, 0, 1)

    def preprocess_batch(self, images):
        batch = np.zeros((len(images), 3, self.size, self.size), dtype=np.float32)
        for image, out in zip(images, batch):
            self.preprocess_into(image, out)
        return batch

    def encode(self, pixels):
        embeddings = []
        for session in self.sessions:
            features = session.run(["image_embeds"], {"pixel_values": pixels})[0]
            norms = np.sqrt(np.square(features.astype(np.float64)).sum(axis=1, keepdims=True))
            embeddings.append((features / np.where(norms > 0, norms, 1.0)).astype(np.float32))
        return embeddings

    def logits(self, embeddings):
        if len(embeddings) == 1:
            fused = embeddings[0] @ self.text_stacked.T
            zero_shot, fine_tuned = fused[:, : self.classes], fused[:, self.classes :]
        else:
            zero_shot, fine_tuned = embeddings[0] @ self.text_zs.T, embeddings[1] @ self.text_ft.T
        return zero_shot * self.scale_zs, fine_tuned * self.scale_ft

    def calibrate(self, zero_shot, fine_tuned, calibration=None):
        """Per image: predicted class, weight, contrast, calibrated and uncalibrated probabilities."""
        calibration = calibration or self.calibration
        method = calibration["method"]
        predicted = fine_tuned.argmax(axis=1)  # first index on ties, as cac-edge
        rows = fine_tuned.shape[0]
        contrast = None
        if method == "none":
            weight = np.ones(rows)
        elif method == "ts":
            weight = np.full(rows, 1.0 / calibration["temperature"])
        elif method == "dac":
            weight = self.dac[predicted]
        else:
            if calibration["distance"] == "logits":
                contrast = np.abs(fine_tuned.astype(np.float64) - zero_shot.astype(np.float64)).mean(axis=1)
            else:
                contrast = np.abs(softmax(fine_tuned, 1.0) - softmax(zero_shot, 1.0)).sum(axis=1)
            effective = contrast
            if calibration["thresholds"] is not None:
                low, high = calibration["thresholds"]
                effective = np.where(contrast < low, 0.0, np.where(contrast > high, high, contrast))
            weight = calibration["alpha"] * np.exp(-effective / calibration["k"])
        return predicted, weight, contrast, softmax(fine_tuned, weight), softmax(fine_tuned, 1.0)

    def predictions(self, zero_shot, fine_tuned, calibration=None):
        """Calibrate, decide and rank: one dict per image (what cac-edge's Prediction holds)."""
        calibration = calibration or self.calibration
        predicted, weight, contrast, probabilities, uncalibrated = self.calibrate(zero_shot, fine_tuned, calibration)
        order = np.argsort(-fine_tuned, axis=1, kind="stable")[:, : self.top_k]
        rows = np.arange(len(predicted))
        confidence = probabilities[rows, predicted]
        out = []
        for row in rows:
            cls = int(predicted[row])
            out.append({
                "label": self.names[cls],
                "base": bool(self.is_base[cls]),
                "confidence": float(confidence[row]),
                "uncalibrated_confidence": float(uncalibrated[row, cls]),
                "decision": "accept" if confidence[row] >= self.threshold else "abstain",
                "threshold": self.threshold,
                "calibration": calibration["method"],
                "weight": float(weight[row]),
                "contrast": None if contrast is None else float(contrast[row]),
                "top_k": [{"label": self.names[int(i)], "confidence": float(probabilities[row, i])} for i in order[row]],
            })
        return out

    def classify_paths(self, paths, calibration=None):
        """The full pipeline on one batch of files."""
        images = [self.decode(path) for path in paths]
        pixels = self.preprocess_batch(images)
        zero_shot, fine_tuned = self.logits(self.encode(pixels))
        return self.predictions(zero_shot, fine_tuned, calibration)


def softmax(logits, weight):
    """softmax(weight * logits) per row in float64, max subtracted first (weight: scalar or [rows])."""
    scaled = logits.astype(np.float64) * np.reshape(np.asarray(weight, dtype=np.float64), (-1, 1))
    scaled -= scaled.max(axis=1, keepdims=True)
    np.exp(scaled, out=scaled)
    scaled /= scaled.sum(axis=1, keepdims=True)
    return scaled


def resolve_threshold(requested, metadata, calibration):
    if requested is not None:
        return float(requested)
    stored = metadata.get("threshold")
    chosen_for = metadata.get("threshold_calibration")
    if stored is not None and chosen_for is not None:
        try:
            if json.loads(chosen_for) == calibration and 0.0 <= float(stored) <= 1.0:
                return float(stored)
        except ValueError:
            pass
    return DEFAULT_THRESHOLD


def expand_inputs(inputs):
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif path.exists():
            files.append(path)
        else:
            raise SystemExit(f"{path}: no such file or directory")
    if not files:
        raise SystemExit("no images given")
    return files


# --------------------------------------------------------------------------------------- modes


def classify(args):
    pipeline = ReferencePipeline(args.bundle, args.cache, threads=args.threads, calibration=args.calibration,
                                 temperature=args.temperature, threshold=args.threshold, top_k=args.top_k,
                                 precision=args.precision)
    paths = expand_inputs(args.inputs)
    out = sys.stdout
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        for path, prediction in zip(chunk, pipeline.classify_paths(chunk)):
            out.write(json.dumps({"path": str(path), **prediction}) + "\n")
            out.flush()


def summarize(samples):
    values = np.sort(np.asarray(samples, dtype=np.float64))
    median = float(np.percentile(values, 50)) if len(values) else math.nan
    return {
        "samples": int(len(values)),
        "median_s": median,
        "p90_s": float(np.percentile(values, 90)) if len(values) else math.nan,
        "mean_s": float(values.mean()) if len(values) else math.nan,
        "min_s": float(values[0]) if len(values) else math.nan,
        "images_per_s": 1.0 / median if median else math.nan,
    }


def cpu_model():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name.strip() in ("model name", "Hardware", "Model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def bench(args):
    pipeline = ReferencePipeline(args.bundle, args.cache, threads=args.threads, top_k=args.top_k)
    # As cac-edge bench: "cac" is the bundle's CAC if it has one, else the paper's defaults.
    calibrations = {
        "none": {"method": "none"},
        "cac": resolve_calibration({"method": "cac"}, pipeline.bundle_calibration, None),
    }
    given = expand_inputs(args.inputs)
    paths, images, skipped = [], [], []
    for path in given:
        try:
            images.append(pipeline.decode(path))
            paths.append(path)
        except Exception as error:  # noqa: BLE001 (left out and listed, like cac-edge bench)
            skipped.append({"path": str(path), "error": str(error)})
    if not images:
        raise SystemExit("none of the images could be decoded")
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    variants = ["encoder", "pipeline.none", "pipeline.cac", "stream.none", "stream.cac", "decode", "preprocess",
                "logits", "calibrate.none", "calibrate.cac"]

    sets = []
    for batch_size in batch_sizes:
        count = -(-len(images) // batch_size) * batch_size
        order = [index % len(images) for index in range(count)]
        batches = [order[start : start + batch_size] for start in range(0, count, batch_size)]
        pixels = [pipeline.preprocess_batch([images[i] for i in batch]) for batch in batches]
        embeddings = [pipeline.encode(batch) for batch in pixels]
        logits = [pipeline.logits(batch) for batch in embeddings]
        sets.append({"batch_size": batch_size, "batches": batches, "paths": [[paths[i] for i in b] for b in batches],
                     "pixels": pixels, "embeddings": embeddings, "logits": logits,
                     "samples": {variant: [] for variant in variants}})

    def run(variant, data, index):
        batch = data["batches"][index]
        if variant == "encoder":
            return pipeline.encode(data["pixels"][index])
        if variant.startswith("pipeline."):
            return pipeline.classify_paths(data["paths"][index], calibrations[variant.split(".")[1]])
        if variant == "decode":
            return [pipeline.decode(path) for path in data["paths"][index]]
        if variant == "preprocess":
            return pipeline.preprocess_batch([images[i] for i in batch])
        if variant == "logits":
            return pipeline.logits(data["embeddings"][index])
        zero_shot, fine_tuned = data["logits"][index]
        return pipeline.predictions(zero_shot, fine_tuned, calibrations[variant.split(".")[1]])

    total = args.warmup_rounds + args.rounds
    for round_index in range(total):
        measured = round_index >= args.warmup_rounds
        label = (f"round {round_index - args.warmup_rounds + 1}/{args.rounds}" if measured
                 else f"warm-up round {round_index + 1}/{args.warmup_rounds}")
        print(f"reference bench: {label}", file=sys.stderr, flush=True)
        for data in sets:
            for offset in range(len(variants)):
                variant = variants[(round_index + offset) % len(variants)]
                if variant.startswith("stream."):
                    # The whole pass, batch after batch (Python has no decode thread to overlap).
                    start = time.perf_counter()
                    for batch_paths in data["paths"]:
                        pipeline.classify_paths(batch_paths, calibrations[variant.split(".")[1]])
                    elapsed = time.perf_counter() - start
                    if measured:
                        data["samples"][variant].append(elapsed / sum(len(b) for b in data["paths"]))
                    continue
                for index in range(len(data["batches"])):
                    start = time.perf_counter()
                    run(variant, data, index)
                    elapsed = time.perf_counter() - start
                    if measured:
                        data["samples"][variant].append(elapsed / data["batch_size"])

    results = []
    for data in sets:
        timing = {variant: summarize(samples) for variant, samples in data["samples"].items()}
        breakdown = {
            "decode": timing["decode"], "preprocess": timing["preprocess"], "logits": timing["logits"],
            "calibrate": {"none": timing["calibrate.none"], "cac": timing["calibrate.cac"]},
        }
        pipeline_timing = {"none": timing["pipeline.none"], "cac": timing["pipeline.cac"]}
        result = {
            "batch_size": data["batch_size"],
            "batches_per_round": len(data["batches"]),
            "encoder": timing["encoder"],
            "pipeline": pipeline_timing,
            "stream": {"none": timing["stream.none"], "cac": timing["stream.cac"]},
            "breakdown": breakdown,
            "non_encoder_per_image_s": sum(breakdown[stage]["median_s"] for stage in ("decode", "preprocess", "logits"))
            + breakdown["calibrate"]["cac"]["median_s"],
            "pipeline_minus_encoder_s": pipeline_timing["cac"]["median_s"] - timing["encoder"]["median_s"],
            "ratios": {
                "pipeline_over_encoder": pipeline_timing["none"]["median_s"] / timing["encoder"]["median_s"],
                "cac_over_none": pipeline_timing["cac"]["median_s"] / pipeline_timing["none"]["median_s"],
                "cac_over_none_from_stages": 1.0 + (breakdown["calibrate"]["cac"]["median_s"]
                                                    - breakdown["calibrate"]["none"]["median_s"])
                / pipeline_timing["none"]["median_s"],
            },
        }
        if args.samples:
            result["samples"] = data["samples"]
        results.append(result)
    report = {
        "tool": "python-reference",
        "machine": {
            "cpu_model": cpu_model(),
            "logical_cores": os.cpu_count(),
            "arch": platform.machine(),
            "python": platform.python_version(),
            "onnxruntime_version": ort.__version__,
            "numpy_version": np.__version__,
            "pillow_version": PIL.__version__,
            "device": "cpu",
        },
        "bundle": {"dir": str(args.bundle), "image_size": pipeline.size},
        "cache": {"path": str(args.cache), "classes": pipeline.classes, "base_classes": int(pipeline.is_base.sum())},
        "images": {"given": len(given), "used": len(images), "skipped": skipped},
        "settings": {"batch_sizes": batch_sizes, "rounds": args.rounds, "warmup_rounds": args.warmup_rounds,
                     "threads": args.threads},
        "calibrations": list(calibrations.values()),
        "results": results,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("classify", "bench"):
        p = sub.add_parser(name)
        p.add_argument("--bundle", required=True)
        p.add_argument("--cache", required=True)
        p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
        p.add_argument("--top-k", type=int, default=3)
        p.add_argument("inputs", nargs="+", help="image files or folders")
    classify_parser = sub.choices["classify"]
    classify_parser.add_argument("--calibration", choices=["none", "cac", "ts", "dac"])
    classify_parser.add_argument("--temperature", type=float)
    classify_parser.add_argument("--threshold", type=float)
    classify_parser.add_argument("--batch-size", type=int, default=8)
    classify_parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    bench_parser = sub.choices["bench"]
    bench_parser.add_argument("--batch-sizes", default="1,32")
    bench_parser.add_argument("--rounds", type=int, default=5)
    bench_parser.add_argument("--warmup-rounds", type=int, default=1)
    bench_parser.add_argument("--samples", action="store_true",
                              help="also every per-image latency, by variant (to merge several runs)")
    args = parser.parse_args()
    if args.mode == "classify":
        classify(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
