#!/usr/bin/env python3
"""Image-encoder variants side by side: fp32 as exported before, fused fp32, int8-dynamic, int8-static.

    onnx/.venv/bin/python onnx/bench/encoders.py                 # ViT-B-32 and the demo bundle
    onnx/.venv/bin/python onnx/bench/encoders.py --arch demo     # one of them
    onnx/.venv/bin/python onnx/bench/encoders.py --baseline-vit OTHER/image_zs.onnx

One process, every encoder loaded into its own ONNX Runtime CPU session (ORT_ENABLE_ALL, what
cac-edge uses; default intra-op threads unless --threads), then per batch size --rounds rounds in
which each encoder runs once, in an order rotated every round, so that a change of machine load
hits all alike. Reported: median ms per batch, the ratio to the fp32 baseline (baseline time /
variant time: > 1 is faster) and the embedding cosine to the baseline on the images timed.

What it builds when missing (under onnx/bench/work/, git-ignored):
  vit-b-32-unfused the export as it was before the fused attention: export.py
                   --no-fuse-attention, random weights, seed 0 (compare.py's vit-b-32 is exported
                   with today's defaults, so it is fused now and not reused)
  vit-b-32-fused   export.py with the fused attention (the default now)
  encoders/        the int8 variants, by onnx/quantize.py's default settings, as export.py
                   --quantize makes them: ViT-B-32 int8-dynamic from the fused graph, int8-static
                   from the unfused one (same weights); the demo's from its committed fp32 graph
                   (its committed int8-dynamic variant is used as it is); int8-static calibrated
                   on the demo's base-class few shots (onnx/demo/images/base)
Results: onnx/bench/work/encoders-<arch>.json. Timings are only meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORK = HERE / "work"
sys.path.insert(0, str(REPO / "onnx"))
import quantize  # noqa: E402  (onnx/quantize.py)
from bundle_io import image_files, load_pixels  # noqa: E402

DEMO = REPO / "onnx" / "demo"
PHOTOS = REPO / "tests" / "fixtures" / "images" / "photos"
CALIBRATION = DEMO / "images" / "base"

# The targets (ratios to the fp32 encoder as exported before).
INT8_SPEEDUP_MIN = 2.4  # int8 at batch 1
FUSED_SPEEDUP_MIN = 1.10  # fused fp32 at batch 1


def log(message: str) -> None:
    print(f"[encoders] {message}", file=sys.stderr, flush=True)


def export(out: Path, *extra: str) -> None:
    if (out / "image_zs.onnx").is_file():
        return
    log(f"exporting {out.name} (minutes)")
    subprocess.run([sys.executable, REPO / "onnx" / "export.py", "--arch", "ViT-B-32", "--random-weights", "--seed", "0",
                    "--out", out, "--name", "vit-b-32-random", "--force", *extra], check=True, cwd=REPO)


def int8(src: Path, tag: str, method: str, preprocess: dict) -> Path:
    dst = WORK / "encoders" / f"{tag}.{method}.onnx"
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        calibration = image_files(CALIBRATION, recursive=True) if method == "int8-static" else None
        info = quantize.quantize_image_encoder(src, dst, method, preprocess, calibration)
        log(f"built {dst.name}: {info['config']} in {info['seconds']:.0f}s")
    return dst


def encoders(arch: str, args) -> tuple[dict[str, Path], dict, list[Path]]:
    if arch == "vit-b-32":
        baseline = args.baseline_vit or WORK / "vit-b-32-unfused" / "image_zs.onnx"
        if args.baseline_vit is None:
            export(WORK / "vit-b-32-unfused", "--no-fuse-attention")
        export(WORK / "vit-b-32-fused")
        fused = WORK / "vit-b-32-fused" / "image_zs.onnx"
        preprocess = tomllib.loads((WORK / "vit-b-32-fused" / "bundle.toml").read_text())["preprocess"]
        models = {"fp32 (before)": baseline, "fp32 fused": fused}
        # As export.py --quantize does: dynamic from the fused graph, static from an unfused one.
        models["int8-dynamic"] = int8(fused, "vit-b-32", "int8-dynamic", preprocess)
        models["int8-static"] = int8(baseline, "vit-b-32", "int8-static", preprocess)
        images = image_files(PHOTOS) + image_files(DEMO / "images" / "test-new", recursive=True)[:24]
    else:
        manifest = tomllib.loads((DEMO / "bundle.toml").read_text())
        preprocess = manifest["preprocess"]
        fp32 = DEMO / manifest["zero_shot"]["image_encoder"]
        models = {"fp32 (before)": fp32}
        committed = manifest["zero_shot"].get("image_encoder_int8")
        for method in quantize.METHODS:
            same = committed and manifest.get("quantization", {}).get("method") == method
            models[method] = DEMO / committed if same else int8(fp32, "demo", method, preprocess)
        images = image_files(DEMO / "images", recursive=True)
    return models, preprocess, images


def session(path: Path, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(s: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def measure(arch: str, args) -> dict:
    models, preprocess, images = encoders(arch, args)
    pixels = load_pixels(images, preprocess).numpy()
    sessions = {name: session(path, args.threads) for name, path in models.items()}
    names = list(sessions)
    base = names[0]
    reference = np.concatenate([run(sessions[base], pixels[i : i + 32]) for i in range(0, len(pixels), 32)])
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    result = {"arch": arch, "images": len(images), "models": {}}
    for name, s in sessions.items():
        e = np.concatenate([run(s, pixels[i : i + 32]) for i in range(0, len(pixels), 32)])
        cos = (e / np.linalg.norm(e, axis=1, keepdims=True) * reference).sum(1)
        result["models"][name] = {"path": str(models[name]), "mb": models[name].stat().st_size / 1e6,
                                  "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "ms": {}}
    for batch in args.batch_sizes:
        x = np.ascontiguousarray(np.resize(pixels, (batch, *pixels.shape[1:])))
        samples = {name: [] for name in names}
        for _ in range(args.warmup):
            for name in names:
                run(sessions[name], x)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                clock = time.perf_counter()
                run(sessions[name], x)
                samples[name].append(time.perf_counter() - clock)
        for name in names:
            result["models"][name]["ms"][str(batch)] = 1e3 * statistics.median(samples[name])
    for name in names:
        m = result["models"][name]
        m["speedup"] = {b: result["models"][base]["ms"][b] / t for b, t in m["ms"].items()}
    return result


def report(result: dict) -> list[dict]:
    print(f"\n{result['arch']}: {result['images']} images, medians per batch, ratio = fp32 (before) / variant")
    batches = list(next(iter(result["models"].values()))["ms"])
    print(f"| encoder | MB | " + " | ".join(f"batch {b}" for b in batches) + " | cosine to fp32 min / mean |")
    print("|---|---|" + "---|" * len(batches) + "---|")
    for name, m in result["models"].items():
        cells = " | ".join(f"{m['ms'][b]:.2f} ms ({m['speedup'][b]:.2f}×)" for b in batches)
        print(f"| {name} | {m['mb']:.1f} | {cells} | {m['cosine_min']:.5f} / {m['cosine_mean']:.5f} |")
    targets = []
    models = result["models"]
    if "1" in batches:
        best = max((m["speedup"]["1"], n) for n, m in models.items() if n.startswith("int8"))
        targets.append({"target": f"{result['arch']}: int8 >= {INT8_SPEEDUP_MIN}x at batch 1", "value": best[0],
                        "met": best[0] >= INT8_SPEEDUP_MIN, "note": best[1]})
        if "fp32 fused" in models:
            v = models["fp32 fused"]["speedup"]["1"]
            targets.append({"target": f"{result['arch']}: fused fp32 >= {FUSED_SPEEDUP_MIN}x at batch 1", "value": v,
                            "met": v >= FUSED_SPEEDUP_MIN, "note": ""})
    for t in targets:
        print(f"  {'MET ' if t['met'] else 'MISSED'}  {t['target']}: {t['value']:.2f}x {t['note']}")
    return targets


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["vit-b-32", "demo", "both"], default="both")
    p.add_argument("--baseline-vit", type=Path, help="today's fp32 ViT-B-32 image_zs.onnx (default: built with --no-fuse-attention)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="intra-op threads (default: ONNX Runtime's)")
    args = p.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    log("timings are only meaningful on a quiet machine")
    WORK.mkdir(exist_ok=True)
    for arch in (["vit-b-32", "demo"] if args.arch == "both" else [args.arch]):
        result = measure(arch, args)
        result["targets"] = report(result)
        result["machine"] = {"platform": platform.platform(), "onnxruntime": ort.__version__, "threads": args.threads,
                             "rounds": args.rounds}
        (WORK / f"encoders-{arch}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
