#!/usr/bin/env python3
"""Add an int8 variant of the image encoder to a cac-edge bundle, without re-exporting.

    python onnx/quantize.py BUNDLE --method int8-dynamic
    python onnx/quantize.py BUNDLE --method int8-static [--calibration-images DIR]

Writes `image_zs.int8.onnx` beside the fp32 `image_zs.onnx` (which is read, never changed),
checks its parity to fp32 (embedding cosine on sample images, zero-shot and fine-tuned label
agreement with the bundle's own text encoders on a class list) and only then updates
`bundle.toml`: `format_version = 2`, `[zero_shot] image_encoder_int8`, the file's sha256 in
`[files]`, and the informative `[quantization]` table (docs/FORMATS.md section 1). The manifest is
replaced atomically (write beside, fsync, rename), so a reader sees the old bundle or the new one.

onnx/export.py --quantize runs the same code on a bundle it is writing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import open_clip

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_io import (  # noqa: E402  (sibling module, not a package)
    BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, BUNDLE_FORMAT_VERSION_VARIANTS, MANIFEST_FILE, ExportError, image_files,
    load_pixels, render_manifest, sha256_file, table_header_comments, write_text_atomic,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CLASSES = REPO_ROOT / "onnx" / "demo" / "classes.txt"
DEFAULT_LABEL_IMAGES = REPO_ROOT / "onnx" / "demo" / "images"
METHODS = ("int8-dynamic", "int8-static")

# Parity bounds of an int8 variant against its fp32 encoder. Label agreement is what a user sees
# and is the bar. The cosine bound catches a broken quantisation that still happens to
# keep the arg-max on the sample (a wrong scale or zero point gives cosines of 0.9 or less), and
# sits well below what int8 measures (ViT-B-32 dynamic: min 0.9997, demo: see onnx/README.md):
# 0.99 is an embedding error of |e - e'| <= sqrt(2 * 0.01) = 0.14 of the norm, which moves a
# cosine logit by at most 0.14 * logit_scale in the worst case and far less in practice.
MIN_LABEL_AGREEMENT = 0.99
MIN_COSINE = 0.99
PARITY_RUN_BATCH = 32


@dataclass(frozen=True)
class QuantConfig:
    """ONNX Runtime quantiser settings (measured on ViT-B-32 and the demo: onnx/README.md)."""

    op_types: tuple[str, ...]
    per_channel: bool
    weight_type: str  # "qint8" | "quint8"
    quant_format: str = "qdq"  # static only: "qdq" | "qoperator"
    calibrate_method: str = "minmax"  # static only: "minmax" | "percentile" | "entropy"
    reduce_range: bool = False
    fp32_projection: bool = False  # keep the final MatMul (the embedding projection) in fp32
    fp32_nodes: tuple[str, ...] = ()  # keep MatMuls whose node name contains one of these in fp32


    def describe(self) -> str:
        extra = f", {self.quant_format}, {self.calibrate_method} calibration" if self.quant_format else ""
        return (f"ops {'+'.join(self.op_types)}, weights {self.weight_type} "
                f"{'per channel' if self.per_channel else 'per tensor'}{extra}"
                f"{', fp32 output projection' if self.fp32_projection else ''}"
                f"{''.join(f', fp32 {part}' for part in self.fp32_nodes)}")


# Chosen by measurement (onnx/README.md, "int8 image encoders"; ViT-B-32, 1 thread, batch 1,
# speed-up over the fp32 graph exported before; demo: label agreement with fp32 on its 420 images):
# - QInt8 weights: QUInt8 weights ran 1.25x (the u8u8 kernels are slow).
# - The patch-embedding Conv stays fp32: ConvInteger made the whole encoder 2.1x instead of 2.5x.
# - The final embedding projection stays fp32 (one small MatMul): demo agreement 98.8 -> 99.3 %.
# - Dynamic: per channel (same speed as per tensor, higher cosine); the fused Attention op becomes
#   QAttention: 3.3x.
# - Static: QOperator (QLinearMatMul), per tensor, MinMax on the calibration images, on a graph
#   *without* the fused Attention op: 2.7x. ORT has no static int8 form of Attention and the QDQ
#   MatMuls of the fused graph stayed unfused (1.1x), so export.py quantises statically from an
#   unfused export of the same weights. QDQ per channel measured the same speed and lower demo
#   agreement (97.1 % vs 98.8 %); percentile/entropy calibration did not help.
DEFAULT_CONFIGS = {
    "int8-dynamic": QuantConfig(op_types=("MatMul", "Attention"), per_channel=True, weight_type="qint8",
                                quant_format="", fp32_projection=True),
    "int8-static": QuantConfig(op_types=("MatMul",), per_channel=False, weight_type="qint8", quant_format="qoperator",
                               fp32_projection=True),
}


def has_fused_attention(path: Path) -> bool:
    graph = onnx.load(str(path), load_external_data=False)
    return any(n.op_type == "Attention" and n.domain == "com.microsoft" for n in graph.graph.node)


def variant_name(fp32_file: str) -> str:
    """image_zs.onnx -> image_zs.int8.onnx"""
    stem = fp32_file.removesuffix(".onnx")
    return f"{stem}.int8.onnx"


class _PixelReader:
    """Feeds calibration images to the static quantiser, 8 at a time."""

    def __init__(self, paths: list[Path], preprocess: dict, input_name: str):
        self.batches = [load_pixels(paths[i : i + 8], preprocess).numpy() for i in range(0, len(paths), 8)]
        self.input_name = input_name
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def rewind(self):
        self.position = 0


def quantize_image_encoder(src: Path, dst: Path, method: str, preprocess: dict,
                           calibration: list[Path] | None = None, config: QuantConfig | None = None) -> dict:
    """Writes the int8 graph `dst` from the fp32 `src`; returns what was done (for the report)."""
    from onnxruntime.quantization import QuantType

    config = config or DEFAULT_CONFIGS[method]
    weight_type = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[config.weight_type]
    clock = time.perf_counter()
    fp32 = onnx.load(str(src), load_external_data=False)
    input_name = fp32.graph.input[0].name
    # Only weight MatMuls (not q·k and attn·v). ONNX shape inference knows no com.microsoft op, so
    # tensors behind the fused Attention/SkipLayerNormalization get the default type (all fp32).
    extra = {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}
    outputs = {o.name for o in fp32.graph.output}
    exclude = [n.name for n in fp32.graph.node if n.op_type == "MatMul" and (
        (config.fp32_projection and set(n.output) & outputs) or any(part in n.name for part in config.fp32_nodes))]
    try:
        _quantize(src, dst, method, config, weight_type, exclude, extra, calibration, preprocess, input_name)
    except ExportError:
        raise
    except Exception as error:  # the ORT quantiser raises plain exceptions on graphs it cannot handle
        raise ExportError(f"{src.name}: ONNX Runtime's quantiser failed ({method}, {config.describe()}): {error}") from error
    _finalize_variant(dst, fp32, method, config, calibration)
    return {"method": method, "config": config.describe(), "seconds": time.perf_counter() - clock,
            "calibration_count": len(calibration or [])}


def _quantize(src, dst, method, config, weight_type, exclude, extra, calibration, preprocess, input_name) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if method == "int8-dynamic":
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(config.op_types), per_channel=config.per_channel,
                         reduce_range=config.reduce_range, weight_type=weight_type, nodes_to_exclude=exclude,
                         extra_options=extra)
    elif method == "int8-static":
        if not calibration:
            raise ExportError("int8-static needs calibration images (--calibration-images DIR)")
        reader = _PixelReader(calibration, preprocess, input_name)
        quantize_static(
            str(src), str(dst), reader,
            quant_format={"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[config.quant_format],
            op_types_to_quantize=list(config.op_types), per_channel=config.per_channel,
            reduce_range=config.reduce_range, activation_type=QuantType.QUInt8, weight_type=weight_type,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                              "entropy": CalibrationMethod.Entropy}[config.calibrate_method],
            nodes_to_exclude=exclude, extra_options=extra,
        )
    else:
        raise ExportError(f"unknown quantisation method {method!r} (choose {', '.join(METHODS)})")


def _finalize_variant(dst: Path, fp32: onnx.ModelProto, method: str, config: QuantConfig,
                      calibration: list[Path] | None) -> None:
    """Provenance metadata, and the ONNX contract of the fp32 graph (names, types, dynamic N)."""
    graph = onnx.load(str(dst))
    meta = {p.key: p.value for p in fp32.metadata_props}
    meta["cac_edge.quantization"] = f"{method}: {config.describe()}" + (
        f"; calibrated on {len(calibration)} images" if calibration else "")
    meta["cac_edge.onnxruntime"] = ort.__version__
    del graph.metadata_props[:]
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name = "cac-edge onnx/quantize.py"
    for ours, theirs in ((graph.graph.input, fp32.graph.input), (graph.graph.output, fp32.graph.output)):
        if [(v.name, v.type.SerializeToString()) for v in ours] != [(v.name, v.type.SerializeToString()) for v in theirs]:
            raise ExportError(f"internal: {dst.name} changed the inputs/outputs of the fp32 graph")
    onnx.checker.check_model(graph)
    onnx.save(graph, str(dst))


# ---------------------------------------------------------------------------------------------
# Parity of a variant to its fp32 encoder


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _embed(session: ort.InferenceSession, pixels: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: pixels[i : i + PARITY_RUN_BATCH]})[0]
                           for i in range(0, len(pixels), PARITY_RUN_BATCH)])


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def read_classes(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if len(names) < 2:
        raise ExportError(f"{path}: need at least two class names, one a line, for the label agreement")
    return names


def variant_parity(bundle_dir: Path, manifest: dict, section: str, variant_file: str,
                   images: list[Path], classes: list[str]) -> dict:
    """Embedding cosine (variant vs fp32) and label agreement with the section's text encoder
    (and the zero-shot one) on `images` against `classes`."""
    model = manifest[section]
    pixels = load_pixels(images, manifest["preprocess"]).numpy()
    fp32 = _embed(_session(bundle_dir / model["image_encoder"]), pixels)
    int8 = _embed(_session(bundle_dir / variant_file), pixels)
    a, b = _normalise(fp32), _normalise(int8)
    cosine = (a * b).sum(1)
    report = {"images": len(images), "classes": len(classes), "cosine_min": float(cosine.min()),
              "cosine_mean": float(cosine.mean())}
    # Dynamic quantisation scales activations per tensor, i.e. over the whole batch, so a row can
    # depend slightly on its batch-mates: measure batch 7 against 7 runs of batch 1.
    session = _session(bundle_dir / variant_file)
    together = _normalise(session.run(None, {session.get_inputs()[0].name: pixels[:7]})[0])
    alone = _normalise(np.concatenate([session.run(None, {session.get_inputs()[0].name: pixels[i : i + 1]})[0]
                                       for i in range(min(7, len(pixels)))]))
    report["batch_cosine_min"] = float((together * alone).sum(1).min())
    length = int(manifest["text"]["context_length"])
    for name in ("zero_shot", "fine_tuned"):
        if name not in manifest or (name != section and "image_encoder" in manifest[name]):
            continue  # a model with its own image encoder is checked with that encoder
        ids = open_clip.tokenize([manifest[name]["template"].format(c) for c in classes], context_length=length).numpy()
        text = _normalise(_session(bundle_dir / manifest[name]["text_encoder"]).run(None, {"input_ids": ids})[0])
        agree = (a @ text.T).argmax(1) == (b @ text.T).argmax(1)
        report[f"label_agreement_{name}"] = float(agree.mean())
    report["label_agreement"] = min(v for k, v in report.items() if k.startswith("label_agreement_"))
    return report


def parity_problems(report: dict) -> list[str]:
    problems = []
    if report["batch_cosine_min"] < MIN_COSINE:
        problems.append(f"batch 7 rows vs batch 1 runs: cosine {report['batch_cosine_min']:.5f} < {MIN_COSINE}")
    if report["label_agreement"] < MIN_LABEL_AGREEMENT:
        problems.append(f"label agreement with fp32 {report['label_agreement']:.2%} < {MIN_LABEL_AGREEMENT:.0%}")
    if report["cosine_min"] < MIN_COSINE:
        problems.append(f"embedding cosine to fp32 {report['cosine_min']:.5f} < {MIN_COSINE}")
    return problems


def print_variant_parity(variant_file: str, report: dict) -> None:
    agreements = ", ".join(f"{k.removeprefix('label_agreement_')} {v:.2%}" for k, v in report.items()
                           if k.startswith("label_agreement_"))
    print(f"int8 parity vs fp32 ({report['images']} images, {report['classes']} classes; bounds: cosine >= {MIN_COSINE}, "
          f"agreement >= {MIN_LABEL_AGREEMENT:.0%})")
    print(f"  {variant_file:20s} cosine min {report['cosine_min']:.5f} mean {report['cosine_mean']:.5f}  "
          f"label agreement {agreements}  batch 1 vs 7: cosine min {report['batch_cosine_min']:.6f}  "
          f"{'ok' if not parity_problems(report) else 'FAIL'}")


# ---------------------------------------------------------------------------------------------
# The manifest


def with_variant(manifest: dict, section: str, variant_file: str, digest: str, quantization: dict) -> dict:
    """The manifest with an int8 variant: format 2, `image_encoder_int8` after `image_encoder`, the
    file's sha256 in [files], and [quantization] after [files]."""
    out = {}
    for key, value in manifest.items():
        if key == "format_version":
            value = BUNDLE_FORMAT_VERSION_VARIANTS
        if key == section:
            value = {k: v for k, v in value.items() if k != "image_encoder_int8"}
            items = list(value.items())
            at = [k for k, _ in items].index("image_encoder") + 1
            value = dict(items[:at] + [("image_encoder_int8", variant_file)] + items[at:])
        if key == "files":
            value = {**value, variant_file: digest}
        if key == "quantization":
            continue
        out[key] = value
        if key == "files":
            out["quantization"] = quantization
    return out


def quantization_table(method: str, report: dict, calibration_label: str | None) -> dict:
    table = {"method": method}
    if calibration_label:
        table["calibration_images"] = calibration_label
    # Rounded down, so the recorded figure never overstates the measurement.
    table["cosine_min"] = float(np.floor(report["cosine_min"] * 1e6) / 1e6)
    table["label_agreement"] = float(np.floor(report["label_agreement"] * 1e4) / 1e4)
    return table


def calibration_label(directory: Path, count: int, bundle_dir: Path) -> str:
    try:
        shown = directory.resolve().relative_to(bundle_dir.resolve())
    except ValueError:
        shown = Path(directory.name)
    return f"{shown.as_posix()} ({count} images)"


# ---------------------------------------------------------------------------------------------
# Standalone: add a variant to an existing bundle


def add_int8_variant(bundle_dir: Path, method: str, calibration_dir: Path | None, parity_dir: Path | None,
                     classes_file: Path | None, force: bool, force_parity_fail: bool) -> dict:
    manifest_path = bundle_dir / MANIFEST_FILE
    text = manifest_path.read_text(encoding="utf-8")
    manifest = tomllib.loads(text)
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("format_version") not in (
            BUNDLE_FORMAT_VERSION, BUNDLE_FORMAT_VERSION_VARIANTS):
        raise ExportError(f"{manifest_path}: not a cac-edge bundle of format version 1 or 2")
    if "image_encoder" in manifest.get("fine_tuned", {}):
        raise ExportError(f"{manifest_path}: the fine-tuned model has its own image encoder (MaPLe/PromptSRC); only the "
                          "zero-shot one would be quantised and --precision int8 needs both, so no variant is added")
    section = "zero_shot"
    fp32_file = manifest[section]["image_encoder"]
    if sha256_file(bundle_dir / fp32_file) != manifest["files"].get(fp32_file):
        raise ExportError(f"{bundle_dir / fp32_file}: sha256 differs from [files]; the bundle is not intact")
    int8_file = variant_name(fp32_file)
    if "image_encoder_int8" in manifest[section] and not force:
        raise ExportError(f"{bundle_dir} already has {manifest[section]['image_encoder_int8']}; pass --force to replace it")
    calibration = None
    if method == "int8-static":
        calibration_dir = calibration_dir or _default_calibration(bundle_dir)
        calibration = image_files(calibration_dir, recursive=True)
        if not calibration:
            raise ExportError(f"{calibration_dir}: no .jpg/.png calibration images")
    images = image_files(parity_dir or _default_parity(bundle_dir), recursive=True)
    if not images:
        raise ExportError(f"{parity_dir}: no .jpg/.png images for the parity check")
    classes = read_classes(classes_file or _default_classes(bundle_dir))

    label = calibration_label(calibration_dir, len(calibration), bundle_dir) if calibration else None
    updated, result = build_variant(bundle_dir, manifest, section, method, calibration, label, images, classes,
                                    force_parity_fail)
    write_text_atomic(manifest_path, render_manifest(updated, table_header_comments(text)))
    return result


def build_variant(bundle_dir: Path, manifest: dict, section: str, method: str, calibration: list[Path] | None,
                  calibration_text: str | None, images: list[Path], classes: list[str],
                  force_parity_fail: bool, source: Path | None = None) -> tuple[dict, dict]:
    """Quantises the section's image encoder into its `.int8.onnx` variant inside `bundle_dir`,
    checks parity, and returns the updated manifest (not yet written) and a report. The variant
    file appears under its final name only after the parity check passed. `source`: the graph to
    quantise when not the fp32 file itself (export.py: an unfused export for int8-static); the
    parity is always measured against the bundle's fp32 file."""
    fp32_file = manifest[section]["image_encoder"]
    int8_file = variant_name(fp32_file)
    source = source or bundle_dir / fp32_file
    config = DEFAULT_CONFIGS[method]
    if method == "int8-static" and has_fused_attention(source):
        # The QOperator quantiser fails on the com.microsoft ops; QDQ runs but stays slow.
        config = dataclasses.replace(config, quant_format="qdq", per_channel=True)
        print(f"warning: {source.name} has ONNX Runtime's fused Attention op, which has no static int8 form; its "
              "q/k/v projections stay fp32 and the QDQ graph measured only 1.1x faster than fp32 on ViT-B-32. "
              "Prefer int8-dynamic, or export.py --quantize int8-static (quantises an unfused export)", file=sys.stderr)
    tmp = bundle_dir / f".{int8_file}.tmp-{os.getpid()}"
    try:
        info = quantize_image_encoder(source, tmp, method, manifest["preprocess"], calibration, config)
        print(f"quantised {fp32_file} -> {int8_file} ({method}: {info['config']}"
              f"{f'; calibrated on {calibration_text}' if calibration_text else ''}) in {info['seconds']:.1f}s")
        report = variant_parity(bundle_dir, manifest, section, tmp.name, images, classes)
        print_variant_parity(int8_file, report)
        problems = parity_problems(report)
        if problems and not force_parity_fail:
            raise ExportError("int8 variant refused: " + "; ".join(problems) + " (--force-parity-fail writes it anyway)")
        if problems:
            print("warning: int8 variant below the parity bounds, written because of --force-parity-fail: "
                  + "; ".join(problems), file=sys.stderr)
        os.replace(tmp, bundle_dir / int8_file)
    finally:
        tmp.unlink(missing_ok=True)
    updated = with_variant(manifest, section, int8_file, sha256_file(bundle_dir / int8_file),
                           quantization_table(method, report, calibration_text))
    return updated, {"file": int8_file, "size": (bundle_dir / int8_file).stat().st_size, "parity": report, **info}


def _default_calibration(bundle_dir: Path) -> Path:
    for candidate in (bundle_dir / "images" / "base",):
        if image_files(candidate, recursive=True):
            return candidate
    raise ExportError("int8-static: pass --calibration-images DIR (the base-class few shots or any image folder)")


def _default_parity(bundle_dir: Path) -> Path:
    return bundle_dir / "images" if image_files(bundle_dir / "images", recursive=True) else DEFAULT_LABEL_IMAGES


def _default_classes(bundle_dir: Path) -> Path:
    return bundle_dir / "classes.txt" if (bundle_dir / "classes.txt").is_file() else DEFAULT_CLASSES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See onnx/README.md and docs/FORMATS.md section 1.")
    p.add_argument("bundle", type=Path, help="bundle directory (its fp32 files are not changed)")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--calibration-images", type=Path,
                   help="int8-static: folder of calibration images, searched recursively (default: BUNDLE/images/base)")
    p.add_argument("--parity-images", type=Path,
                   help="images for the parity check, searched recursively (default: BUNDLE/images, else onnx/demo/images)")
    p.add_argument("--classes", type=Path, help="class names for the label agreement (default: BUNDLE/classes.txt, else onnx/demo/classes.txt)")
    p.add_argument("--force", action="store_true", help="replace an existing int8 variant")
    p.add_argument("--force-parity-fail", action="store_true", help="write the variant even below the parity bounds")
    args = p.parse_args(argv)
    try:
        result = add_int8_variant(args.bundle, args.method, args.calibration_images, args.parity_images, args.classes,
                                  args.force, args.force_parity_fail)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.bundle / result['file']} ({result['size'] / 1e6:.2f} MB) and updated {args.bundle / MANIFEST_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
