#!/usr/bin/env python3
"""cac-edge against the reference Python pipeline, side by side, on the same bundle and images.

Runs, in this order (everything generated goes to onnx/bench/work/, which git ignores):

  1. `cargo build --release` (skip with --no-build) and, for --arch vit-b-32, once: an open_clip
     ViT-B-32 bundle with random weights and a random CoOp context, exported by onnx/export.py.
  2. The text-feature caches, with `cac-edge cache build`: the bench cache (the demo's 60 classes
     for the demo bundle, 1 000 classes for ViT-B-32) and a 1 000-class cache for the cold start
     (the demo's 60 names plus 940 generated "adjective noun" names; base = the demo's base list).
  3. Agreement: `cac-edge classify` and `reference_pipeline.py classify` on the bench images, and
     on lossless PNG copies of them (decoded once by PIL, so both sides see identical pixels and
     only the resize and arithmetic can differ): on the copies every label must match and the
     median |confidence difference| be <= --agree-tol (1e-3); the share within it and the
     maximum are reported. On the files as given the JPEG decoders differ too (zune-jpeg vs
     libjpeg-turbo): reported, not judged.
  4. `cac-edge bench --json --samples` and `reference_pipeline.py bench --samples` with the same
     images, batch sizes and --threads, alternated (--alternations invocations each, the --rounds
     shared out), the per-image samples of each tool pooled and the statistics recomputed.
  5. Cold start, process start -> first decision line on stdout, classifying one image with the
     1 000-class cache: cac-edge (default, i.e. hashing the image encoder and cache data, and with
     --no-verify) against the Python reference, interleaved, one discarded warm-up each, medians.
  6. The targets of the performance issue, PASS/MISS, with every number they come from; the whole
     record is written to onnx/bench/work/compare-<arch>.json.

    onnx/.venv/bin/python onnx/bench/compare.py                    # demo bundle, onnx/demo/images
    onnx/.venv/bin/python onnx/bench/compare.py --arch vit-b-32    # real-size architecture
    onnx/.venv/bin/python onnx/bench/compare.py --bundle B --cache C --images DIR_OR_FILES...

Timings are only meaningful on a quiet machine: the script says so, but cannot check it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
import tomllib

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORK = HERE / "work"
REFERENCE = HERE / "reference_pipeline.py"
DEMO_BUNDLE = REPO / "onnx" / "demo"
DEMO_CLASSES = DEMO_BUNDLE / "classes.txt"
DEMO_BASE = DEMO_BUNDLE / "base.txt"
DEMO_IMAGES = DEMO_BUNDLE / "images"
PHOTOS = REPO / "tests" / "fixtures" / "images" / "photos"

# The targets.
CAC_OVERHEAD_MAX = 1.01
PIPELINE_EFFICIENCY_MAX = 1.10  # on ViT-B-32
NON_ENCODER_MAX_FRACTION = 1 / 3
THROUGHPUT_MIN = {"vit-b-32": 1.0, "demo": 1.5}
COLD_START_MAX = 0.25

ADJECTIVES = ["wooden", "metal", "plastic", "glass", "paper", "stone", "rusty", "shiny", "striped", "spotted",
              "tiny", "giant", "old", "new", "broken", "folded", "frozen", "wet", "dusty", "painted"]
NOUNS = ["chair", "table", "lamp", "bottle", "cup", "bowl", "spoon", "knife", "fork", "plate", "clock", "phone",
         "laptop", "keyboard", "mouse", "book", "pencil", "bag", "box", "basket", "bucket", "hammer", "wrench",
         "ladder", "bicycle", "car", "truck", "boat", "train", "bus", "tractor", "drone", "camera", "helmet",
         "shoe", "boot", "hat", "glove", "umbrella", "kettle", "teapot", "guitar", "drum", "violin", "piano",
         "bench", "fence"]


def log(message):
    print(f"[compare] {message}", file=sys.stderr, flush=True)


def run(cmd, **kwargs):
    log(" ".join(str(part) for part in cmd) if len(cmd) < 20 else " ".join(str(part) for part in cmd[:18]) + " ...")
    return subprocess.run([str(part) for part in cmd], check=True, **kwargs)


def read_names(path):
    names = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(line)
    return names


# ------------------------------------------------------------------------------ inputs and setup


def build_binary(args):
    if not args.no_build:
        run(["cargo", "build", "--release", "--quiet"], cwd=REPO)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    binary = target / "release" / "cac-edge"
    if not binary.exists():
        raise SystemExit(f"{binary} does not exist: run `cargo build --release`")
    return binary


def vit_bundle():
    """An open_clip ViT-B-32 with random weights and a random CoOp context (so the fine-tuned
    text features differ from the zero-shot ones), exported once by onnx/export.py."""
    out = WORK / "vit-b-32"
    if (out / "bundle.toml").exists():
        return out
    from safetensors.numpy import save_file

    WORK.mkdir(parents=True, exist_ok=True)
    ctx_path = WORK / "vit-b-32-coop-ctx.safetensors"
    rng = np.random.default_rng(0)
    # CoOp initialises its context with N(0, 0.02), the scale of CLIP's token embeddings.
    save_file({"ctx": rng.normal(0.0, 0.02, (4, 512)).astype(np.float32)}, str(ctx_path),
              metadata={"method": "coop", "description": "random context, for benchmarking only"})
    log("exporting an open_clip ViT-B-32 with random weights (about a minute and a half, 860 MB)")
    run([sys.executable, REPO / "onnx" / "export.py", "--arch", "ViT-B-32", "--random-weights", "--seed", "0",
         "--prompt-learner", ctx_path, "--out", out, "--name", "vit-b-32-random"], cwd=REPO)
    return out


def class_lists():
    """The demo's lists, and a 1 000-class list: the demo's 60 names plus generated ones."""
    WORK.mkdir(parents=True, exist_ok=True)
    demo = read_names(DEMO_CLASSES)
    generated = [f"{adjective} {noun}" for noun in NOUNS for adjective in ADJECTIVES]
    names = demo + [name for name in generated if name not in set(demo)][: 1000 - len(demo)]
    assert len(names) == 1000 and len(set(names)) == 1000
    path = WORK / "classes-1000.txt"
    text = "# 1 000 classes for benchmarking: the demo's 60, then generated names\n" + "\n".join(names) + "\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return {"demo": (DEMO_CLASSES, DEMO_BASE), "1000": (path, DEMO_BASE)}


def cache_for(binary, bundle, classes, base, tag, args):
    """Builds (or reuses) the cache of `bundle` for a class list in onnx/bench/work/caches/."""
    out = WORK / "caches" / f"{bundle.resolve().name}-{tag}.safetensors"
    sources = [bundle / "bundle.toml", classes, base]
    if out.exists() and all(out.stat().st_mtime >= source.stat().st_mtime for source in sources):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    run([binary, "cache", "build", "--bundle", bundle, "--classes", classes, "--base", base, "--output", out,
         "--device", args.device, *threads_flag(args)], stdout=subprocess.DEVNULL)
    return out


def threads_flag(args):
    return ["--threads", str(args.threads)] if args.threads else []


def expand(inputs):
    """Image files of the inputs, as the reference pipeline expands them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reference_pipeline import expand_inputs
    return expand_inputs(inputs)


def default_images(arch, count):
    if arch == "demo":
        return expand([DEMO_IMAGES])
    # Real photos (all of them) plus demo images spread over the classes, `count` in all.
    photos = expand([PHOTOS])
    demo = expand([DEMO_IMAGES])
    extra = max(0, count - len(photos))
    step = max(1, len(demo) // max(1, extra))
    return photos + demo[::step][:extra]


def lossless_copies(images, arch):
    """PNG copies of the images as PIL decodes them (RGB), so both pipelines see the same pixels."""
    from PIL import Image

    folder = WORK / "lossless" / arch
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    copies = []
    for index, path in enumerate(images):
        copy = folder / f"{index:04d}.png"
        with Image.open(path) as image:
            image.convert("RGB").save(copy)
        copies.append(copy)
    return copies


# ----------------------------------------------------------------------------------- the checks


def classify_lines(cmd):
    result = subprocess.run([str(part) for part in cmd], check=True, capture_output=True, text=True)
    records = {}
    for line in result.stdout.splitlines():
        record = json.loads(line)
        if "error" in record:
            raise SystemExit(f"{cmd[0]} could not classify {record['path']}: {record['error']}")
        records[str(Path(record["path"]).resolve())] = record
    return records


def agreement(binary, bundle, cache, images, args):
    def both(paths):
        common = ["--bundle", bundle, "--cache", cache, *threads_flag(args)]
        rust = classify_lines([binary, "classify", *common, "--device", args.device, *paths])
        python = classify_lines([sys.executable, REFERENCE, "classify", *common, *paths])
        keys = [str(Path(path).resolve()) for path in paths]
        labels = sum(rust[key]["label"] == python[key]["label"] for key in keys)
        deltas = np.array([abs(rust[key]["confidence"] - python[key]["confidence"]) for key in keys])
        return {
            "images": len(keys),
            "labels_agree": int(labels),
            "confidence_abs_diff_median": float(np.median(deltas)),
            "confidence_abs_diff_p99": float(np.percentile(deltas, 99)),
            "confidence_abs_diff_max": float(deltas.max()),
            "within_tol": int((deltas <= args.agree_tol).sum()),
            "calibration": rust[keys[0]]["calibration"],
        }

    log("agreement: cac-edge classify vs reference classify")
    as_given = both(images)
    lossless = both(lossless_copies(images, args.arch))
    # Judged on identical pixels: every label, and the median confidence difference (the tiny demo
    # model at 32 px turns the resize's last-bit differences into a few 1e-3 on some images).
    passed = lossless["labels_agree"] == lossless["images"] and lossless["confidence_abs_diff_median"] <= args.agree_tol
    return {"as_given": as_given, "lossless": lossless, "tolerance": args.agree_tol, "pass": passed}


def benches(binary, bundle, cache, images, args):
    """Both benches, alternated: --alternations invocations of each (cac-edge, python, cac-edge, ...),
    each with its share of the rounds, so that a change of machine load hits both tools; the
    per-image samples of the invocations are then merged and every statistic recomputed."""
    per_invocation = -(-args.rounds // args.alternations)
    common = ["--bundle", bundle, "--cache", cache, "--batch-sizes", args.batch_sizes, "--rounds", per_invocation,
              "--warmup-rounds", args.warmup_rounds, *threads_flag(args)]
    rust_runs, python_runs = [], []
    for invocation in range(args.alternations):
        log(f"cac-edge bench on {len(images)} images ({invocation + 1}/{args.alternations})")
        rust_runs.append(json.loads(run([binary, "bench", "--json", "--samples", *common, "--device", args.device,
                                         *images], stdout=subprocess.PIPE, text=True).stdout))
        log(f"reference bench on {len(images)} images ({invocation + 1}/{args.alternations})")
        python_runs.append(json.loads(run([sys.executable, REFERENCE, "bench", "--samples", *common, *images],
                                          stdout=subprocess.PIPE, text=True).stdout))
    return merge_runs(rust_runs), merge_runs(python_runs)


def summarize(samples):
    """As both benches do: median, p90 (numpy's linear interpolation), mean, min, 1 / median."""
    values = np.sort(np.asarray(samples, dtype=np.float64))
    median = float(np.percentile(values, 50))
    return {"samples": int(len(values)), "median_s": median, "p90_s": float(np.percentile(values, 90)),
            "mean_s": float(values.mean()), "min_s": float(values[0]), "images_per_s": 1.0 / median}


def timing_path(variant):
    """Where a variant's statistics live in a bench result ("calibrate.cac" -> breakdown.calibrate.cac)."""
    head, _, tail = variant.partition(".")
    if head in ("encoder",):
        return ["encoder"]
    if head in ("pipeline", "stream"):
        return [head, tail]
    if head == "calibrate":
        return ["breakdown", "calibrate", tail]
    return ["breakdown", head]


def merge_runs(runs):
    """One report from several invocations of the same bench: samples pooled, statistics and the
    derived numbers recomputed with the benches' own formulas."""
    merged = json.loads(json.dumps(runs[0]))
    merged["settings"]["rounds"] = sum(run["settings"]["rounds"] for run in runs)
    merged["settings"]["invocations"] = len(runs)
    merged["invocation_encoder_medians_s"] = [[result["encoder"]["median_s"] for result in run["results"]]
                                              for run in runs]
    for index, result in enumerate(merged["results"]):
        pooled = {}
        for run in runs:
            for variant, values in run["results"][index]["samples"].items():
                pooled.setdefault(variant, []).extend(values)
        for variant, values in pooled.items():
            *parents, last = timing_path(variant)
            node = result
            for key in parents:
                node = node[key]
            node[last] = summarize(values)
        result["samples"] = pooled
        derive(result)
    return merged


def derive(result):
    breakdown, pipeline = result["breakdown"], result["pipeline"]
    none = pipeline["none"]["median_s"]
    result["non_encoder_per_image_s"] = (breakdown["decode"]["median_s"] + breakdown["preprocess"]["median_s"]
                                         + breakdown["logits"]["median_s"] + breakdown["calibrate"]["cac"]["median_s"])
    result["pipeline_minus_encoder_s"] = pipeline["cac"]["median_s"] - result["encoder"]["median_s"]
    ratios = result["ratios"]
    ratios["pipeline_over_encoder"] = none / result["encoder"]["median_s"]
    ratios["cac_over_none"] = pipeline["cac"]["median_s"] / none
    ratios["cac_over_none_from_stages"] = 1.0 + (breakdown["calibrate"]["cac"]["median_s"]
                                                 - breakdown["calibrate"]["none"]["median_s"]) / none
    for method in ("dac", "ts"):
        if method in pipeline:
            ratios[f"{method}_over_none"] = pipeline[method]["median_s"] / none


def time_to_first_line(cmd):
    start = time.perf_counter()
    process = subprocess.Popen([str(part) for part in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    line = process.stdout.readline()
    elapsed = time.perf_counter() - start
    _, stderr = process.communicate()
    if process.returncode != 0 or not line.strip() or "error" in json.loads(line):
        raise SystemExit(f"cold start run failed ({process.returncode}): {' '.join(map(str, cmd))}\n{line}{stderr}")
    return elapsed


def has_int8(bundle):
    with open(Path(bundle) / "bundle.toml", "rb") as handle:
        return "image_encoder_int8" in tomllib.load(handle)["zero_shot"]


def cold_start(binary, bundle, cache_1000, image, args):
    """Process start to the first decision line. Each lever of cac-edge's start is its own row:
    hashing every start (--verify-always) against the verification stamp (the default, warm after
    the first run), no verification, the graph cache (warm after the first run), and int8."""
    common = ["--bundle", bundle, "--cache", cache_1000, *threads_flag(args)]
    rust = [binary, "classify", *common, "--device", args.device]
    graphs = ["--graph-cache", str(WORK / "graph-cache")]
    commands = {
        "cac-edge --verify-always": [*rust, "--verify-always", image],
        "cac-edge": [*rust, image],
        "cac-edge --no-verify": [*rust, "--no-verify", image],
        "cac-edge --graph-cache": [*rust, *graphs, image],
        "python": [sys.executable, REFERENCE, "classify", *common, image],
    }
    if has_int8(bundle):
        commands["cac-edge --precision int8"] = [*rust, "--precision", "int8", image]
        commands["cac-edge --precision int8 --graph-cache"] = [*rust, "--precision", "int8", *graphs, image]
        commands["python --precision int8"] = [sys.executable, REFERENCE, "classify", *common, "--precision", "int8",
                                               image]
    log(f"cold start: {args.cold_reps} runs each (+1 warm-up), interleaved, 1 000 classes, {image}")
    times = {name: [] for name in commands}
    for repetition in range(args.cold_reps + 1):
        for name, cmd in commands.items():
            elapsed = time_to_first_line(cmd)
            if repetition > 0:
                times[name].append(elapsed)
    return {name: {"median_s": statistics.median(values), "runs_s": values} for name, values in times.items()}


# ---------------------------------------------------------------------------------------- report


def ms(seconds):
    if seconds != seconds:  # NaN
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds:.3f} s"


def side_by_side(rust, python):
    lines = []
    for r, p in zip(rust["results"], python["results"]):
        lines.append(f"\nbatch {r['batch_size']}: per-image medians (p90)   {'cac-edge':>24} {'python':>24} {'cac-edge/python':>16}")

        def row(name, rt, pt):
            ratio = rt["median_s"] / pt["median_s"] if pt else float("nan")
            rs = f"{ms(rt['median_s'])} ({ms(rt['p90_s'])})"
            ps = f"{ms(pt['median_s'])} ({ms(pt['p90_s'])})" if pt else "-"
            lines.append(f"  {name:<38} {rs:>24} {ps:>24} {ratio:>16.3f}")

        row("(a) encoder on a ready tensor", r["encoder"], p["encoder"])
        row("(b) pipeline, none", r["pipeline"]["none"], p["pipeline"]["none"])
        row("(c) pipeline, cac", r["pipeline"]["cac"], p["pipeline"]["cac"])
        row("(d) pipeline, dac", r["pipeline"]["dac"], None)
        row("(d) pipeline, ts", r["pipeline"]["ts"], None)
        row("streaming, none", r["stream"]["none"], p["stream"]["none"])
        row("streaming, cac", r["stream"]["cac"], p["stream"]["cac"])
        row("decode", r["breakdown"]["decode"], p["breakdown"]["decode"])
        row("preprocess", r["breakdown"]["preprocess"], p["breakdown"]["preprocess"])
        row("logits", r["breakdown"]["logits"], p["breakdown"]["logits"])
        row("calibrate+decide, none", r["breakdown"]["calibrate"]["none"], p["breakdown"]["calibrate"]["none"])
        row("calibrate+decide, cac", r["breakdown"]["calibrate"]["cac"], p["breakdown"]["calibrate"]["cac"])
        rn, pn = r["non_encoder_per_image_s"], p["non_encoder_per_image_s"]
        lines.append(f"  {'non-encoder sum (decode..cac)':<38} {ms(rn):>24} {ms(pn):>24} {rn / pn:>16.3f}")
        for kind, label in (("pipeline", "images/s, cac, per batch"), ("stream", "images/s, cac, streaming")):
            rate, reference = r[kind]["cac"]["images_per_s"], p[kind]["cac"]["images_per_s"]
            lines.append(f"  {label:<38} {rate:>24.1f} {reference:>24.1f} {rate / reference:>16.3f}")
        lines.append(f"  {'ratio b/a':<38} {r['ratios']['pipeline_over_encoder']:>24.3f} "
                     f"{p['ratios']['pipeline_over_encoder']:>24.3f}")
        lines.append(f"  {'ratio c/b':<38} {r['ratios']['cac_over_none']:>24.4f} {p['ratios']['cac_over_none']:>24.4f}")
        lines.append(f"  {'ratio c/b from the calibrate stages':<38} {r['ratios']['cac_over_none_from_stages']:>24.4f} "
                     f"{p['ratios']['cac_over_none_from_stages']:>24.4f}")
    return "\n".join(lines)


def targets(rust, python, cold, agree, arch):
    rows = []

    def add(name, value, limit, passed, note=""):
        rows.append({"target": name, "value": value, "limit": limit,
                     "status": "PASS" if passed else "MISS" if passed is not None else "info", "note": note})

    for r, p in zip(rust["results"], python["results"]):
        batch = r["batch_size"]
        cac = r["ratios"]["cac_over_none"]
        add(f"CAC overhead (c)/(b), batch {batch}", f"{cac:.4f}", f"<= {CAC_OVERHEAD_MAX}", cac <= CAC_OVERHEAD_MAX,
            f"from the calibrate stages: {r['ratios']['cac_over_none_from_stages']:.4f}")
        efficiency = r["ratios"]["pipeline_over_encoder"]
        judged = arch == "vit-b-32"
        add(f"pipeline efficiency (b)/(a), batch {batch}", f"{efficiency:.3f}", f"<= {PIPELINE_EFFICIENCY_MAX}",
            efficiency <= PIPELINE_EFFICIENCY_MAX if judged else None, "" if judged else "target is for ViT-B-32")
        fraction = r["non_encoder_per_image_s"] / p["non_encoder_per_image_s"]
        add(f"non-encoder time / python's, batch {batch}",
            f"{fraction:.3f} ({ms(r['non_encoder_per_image_s'])} vs {ms(p['non_encoder_per_image_s'])})",
            "<= 0.333", fraction <= NON_ENCODER_MAX_FRACTION)
        minimum = THROUGHPUT_MIN.get(arch)
        for kind, label in (("stream", "streaming"), ("pipeline", "per batch call")):
            rate, reference = r[kind]["cac"]["images_per_s"], p[kind]["cac"]["images_per_s"]
            speed = rate / reference
            judged = minimum if kind == "stream" else None
            add(f"images/s (cac, {label}) / python's, batch {batch}", f"{speed:.3f} ({rate:.1f} vs {reference:.1f})",
                f">= {minimum}" if minimum else "-", speed >= judged if judged else None,
                "" if judged else "judged on streaming" if minimum else "no target for this bundle")
    # Each row against the Python reference on the same precision; the target is judged on the
    # fp32 graph cache (verification by stamp, the default), the path whose numbers match python's.
    notes = {"cac-edge --verify-always": "hashing the image encoder and cache at every start",
             "cac-edge": "verification stamp (default), no graph cache",
             "cac-edge --no-verify": "no hashing at all",
             "cac-edge --graph-cache": "the lever that meets the target: saved graph with packed weights"}
    for name in cold:
        if name.startswith("python"):
            continue
        reference_name = "python --precision int8" if "int8" in name else "python"
        reference = cold[reference_name]["median_s"]
        ratio = cold[name]["median_s"] / reference
        judged = name == "cac-edge --graph-cache"
        add(f"cold start {name} / {reference_name} (1 000 classes)",
            f"{ratio:.3f} ({ms(cold[name]['median_s'])} vs {ms(reference)})", f"<= {COLD_START_MAX}" if judged else "-",
            ratio <= COLD_START_MAX if judged else None, notes.get(name, ""))
    lossless, as_given = agree["lossless"], agree["as_given"]
    add("agreement with python (lossless copies)",
        f"labels {lossless['labels_agree']}/{lossless['images']}, |dconf| <= {agree['tolerance']:g}: "
        f"{lossless['within_tol']}/{lossless['images']} (median {lossless['confidence_abs_diff_median']:.2e}, "
        f"max {lossless['confidence_abs_diff_max']:.2e})", "labels, median", agree["pass"])
    add("agreement, files as given (JPEG decoders differ)",
        f"labels {as_given['labels_agree']}/{as_given['images']}, |dconf| <= {agree['tolerance']:g}: "
        f"{as_given['within_tol']}/{as_given['images']} (median {as_given['confidence_abs_diff_median']:.2e}, "
        f"max {as_given['confidence_abs_diff_max']:.2e})", "-", None)
    return rows


def print_targets(rows):
    width = max(len(row["target"]) for row in rows)
    value_width = max(len(row["value"]) for row in rows)
    print(f"\n{'target':<{width}}  {'value':<{value_width}}  {'limit':<8}  status")
    for row in rows:
        note = f"  ({row['note']})" if row["note"] else ""
        print(f"{row['target']:<{width}}  {row['value']:<{value_width}}  {row['limit']:<8}  {row['status']}{note}")


# ------------------------------------------------------------------------------------------ main


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["demo", "vit-b-32"], default="demo",
                        help="demo: onnx/demo; vit-b-32: a random-weight ViT-B-32 exported into onnx/bench/work")
    parser.add_argument("--bundle", type=Path, help="another bundle (default: the one --arch names)")
    parser.add_argument("--cache", type=Path, help="its cache (default: built into onnx/bench/work/caches)")
    parser.add_argument("--classes", type=Path, help="class list for the built cache (default: per --arch)")
    parser.add_argument("--base", type=Path, help="base classes for the built cache (default: the demo's)")
    parser.add_argument("--images", nargs="+", help="images or folders (default: per --arch)")
    parser.add_argument("--image-count", type=int, default=32,
                        help="vit-b-32 default image set: the test photos plus demo images, this many in all")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--rounds", type=int, default=4,
                        help="measured rounds per tool, in all (default 4), shared out over the alternations")
    parser.add_argument("--alternations", type=int, default=2,
                        help="invocations of each bench, alternated cac-edge / python (default 2)")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, help="intra-op threads for both (default: ONNX Runtime's)")
    parser.add_argument("--device", default="cpu", help="cac-edge --device (the reference runs on CPU)")
    parser.add_argument("--cold-reps", type=int, default=5)
    parser.add_argument("--agree-tol", type=float, default=1e-3,
                        help="confidence agreement: the median |difference| on lossless copies must be at most "
                             "this (default 1e-3); how many are within it is reported")
    parser.add_argument("--no-build", action="store_true", help="use target/release/cac-edge as it is")
    args = parser.parse_args()

    print("note: timings are only meaningful on a quiet machine (nothing else running)", file=sys.stderr)
    binary = build_binary(args)
    bundle = args.bundle or (vit_bundle() if args.arch == "vit-b-32" else DEMO_BUNDLE)
    lists = class_lists()
    if args.cache:
        cache = args.cache
    else:
        default_list = "1000" if args.arch == "vit-b-32" else "demo"
        classes, base = args.classes or lists[default_list][0], args.base or lists[default_list][1]
        tag = default_list if not args.classes else Path(classes).stem
        cache = cache_for(binary, bundle, Path(classes), Path(base), tag, args)
    cache_1000 = cache_for(binary, bundle, *lists["1000"], "1000", args)
    images = expand(args.images) if args.images else default_images(args.arch, args.image_count)
    if not images:
        raise SystemExit("no images")

    agree = agreement(binary, bundle, cache, images, args)
    rust, python = benches(binary, bundle, cache, images, args)
    cold = cold_start(binary, bundle, cache_1000, images[0], args)

    machine = rust["machine"]
    print(f"\n== cac-edge vs reference Python pipeline: {args.arch}, bundle {bundle}, cache {cache} "
          f"({rust['cache']['classes']} classes), {len(images)} images")
    print(f"machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores, {machine['arch']}, "
          f"ONNX Runtime {machine['onnxruntime_version']} (cac-edge) / {python['machine']['onnxruntime_version']} "
          f"(python), device {machine['device']}, threads {args.threads or 'default'}, "
          f"{rust['settings']['rounds']} rounds in {args.alternations} alternated invocations "
          f"(+{args.warmup_rounds} warm-up each)")
    print("encoder medians per invocation (drift check): cac-edge "
          + ", ".join("/".join(ms(value) for value in run) for run in rust["invocation_encoder_medians_s"])
          + "; python " + ", ".join("/".join(ms(value) for value in run) for run in python["invocation_encoder_medians_s"]))
    print(side_by_side(rust, python))
    print("\ncold start (process start -> first decision line, 1 000 classes), medians of "
          f"{args.cold_reps}: " + ", ".join(f"{name} {ms(value['median_s'])}" for name, value in cold.items()))
    rows = targets(rust, python, cold, agree, args.arch)
    print_targets(rows)

    record = {"arch": args.arch, "bundle": str(bundle), "cache": str(cache), "cache_1000": str(cache_1000),
              "images": [str(path) for path in images], "host": platform.node(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cac_edge": rust, "python": python,
              "cold_start": cold, "agreement": agree, "targets": rows}
    out = WORK / f"compare-{args.arch}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nfull record: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
