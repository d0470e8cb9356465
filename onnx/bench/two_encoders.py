#!/usr/bin/env python3
"""Two image encoders per frame (MaPLe/PromptSRC bundles under CAC): which form is fastest on CPU.

    onnx/.venv/bin/python onnx/bench/two_encoders.py BUNDLE [--batch-sizes 1,8] [--rounds 20]

BUNDLE must have `[fine_tuned] image_encoder` (image_ft.onnx). Each form computes the zero-shot
and the fine-tuned embeddings of the same pixel tensor; all are timed in one process, in rounds
whose order is rotated every round, so that a change of machine load hits all alike:

  ft-alone          image_ft alone, every core: what the uncalibrated pipeline runs (the baseline)
  sequential        two sessions in turn, each with every core
  concurrent        two sessions at once on two threads, each with half the cores (cac-edge's
                    default, `--encoder-schedule concurrent`)
  one-graph-parallel  ONE session whose graph holds both encoders on the one input, weights
                    shared where the two are byte-identical (all but the prompts), run by ONNX
                    Runtime's parallel executor (2 inter-op threads × half the cores)
  one-graph-sequential  the same graph, sequential executor, every core

`--make-vit-b-32-maple` first builds onnx/bench/work/vit-b-32-maple (git-ignored) and measures it:
open_clip ViT-B-32 with random weights (seed 0) and a random MaPLe prompt learner of the official
configs' shape (N_CTX 2, PROMPT_DEPTH 9) in the official Dassl layout, exported by onnx/export.py.

Reported: median ms per batch and the ratio to ft-alone (the price of calibration on the bare
encoders; cac-edge `bench` reports the same as (a')/(a), and (c)/(b) on the whole pipeline).
Results: onnx/bench/work/two-encoders-<bundle name>.json. Only meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
INPUT = "pixel_values"


def log(message: str) -> None:
    print(f"[two-encoders] {message}", file=sys.stderr, flush=True)


def one_graph(zero_shot: Path, fine_tuned: Path, out: Path) -> dict:
    """Both encoders in one graph on one `pixel_values` input; every name of the fine-tuned graph
    prefixed, and its initializers that are byte-identical to a zero-shot one dropped in favour
    of that one (the CLIP weights the two share). Returns what was shared."""
    zs, ft = onnx.load(str(zero_shot)), onnx.load(str(fine_tuned))
    by_bytes = {(init.data_type, tuple(init.dims), init.raw_data): init.name for init in zs.graph.initializer if init.raw_data}
    rename, kept, shared_bytes = {}, [], 0
    for init in ft.graph.initializer:
        twin = by_bytes.get((init.data_type, tuple(init.dims), init.raw_data)) if init.raw_data else None
        if twin is not None:
            rename[init.name] = twin
            shared_bytes += len(init.raw_data)
        else:
            rename[init.name] = f"ft/{init.name}"
            init.name = rename[init.name]
            kept.append(init)

    def renamed(name: str) -> str:
        if not name or name == INPUT:
            return name
        return rename.get(name, f"ft/{name}")

    nodes = []
    for node in ft.graph.node:
        node.name = f"ft/{node.name}"
        inputs, outputs = [renamed(n) for n in node.input], [renamed(n) for n in node.output]
        del node.input[:], node.output[:]
        node.input.extend(inputs)
        node.output.extend(outputs)
        nodes.append(node)
    graph = zs.graph
    graph.node.extend(nodes)
    graph.initializer.extend(kept)
    for output in ft.graph.output:
        output.name = renamed(output.name)
        graph.output.append(output)
    domains = {opset.domain for opset in zs.opset_import}
    zs.opset_import.extend(opset for opset in ft.opset_import if opset.domain not in domains)
    onnx.save(zs, str(out))
    return {"shared_initializer_bytes": shared_bytes, "own_fine_tuned_initializers": len(kept)}


def make_vit_b_32_maple(out: Path) -> Path:
    """A ViT-B-32-sized MaPLe bundle: random CLIP weights, a random official-layout prompt learner."""
    if (out / "bundle.toml").is_file():
        return out
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE.parent / "fixtures"))
    import export
    import make_deep_prompt_bundles as fixtures
    import torch

    clip_args = ["--arch", "ViT-B-32", "--random-weights", "--seed", "0"]
    clip = export.load_clip(export.parse_args(clip_args + ["--out", str(out)]))
    spec = dict(fixtures.MAPLE, n_ctx=2, depth=9)  # the official vit_b16_c2_ep5_batch4_2ctx config
    state = fixtures.maple_prompt_state(clip.model, clip.tokenizer, spec)
    state["logit_scale"] = clip.model.logit_scale.detach().clone()
    learner = WORK / "vit-b-32-maple-learner" / "MultiModalPromptLearner" / "model.pth.tar-5"
    learner.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixtures.dassl_checkpoint(spec, state), learner)
    log(f"exporting {out} (a few minutes)")
    export.export_bundle(export.parse_args(clip_args + ["--prompt-learner", str(learner), "--out", str(out)]))
    return out


def session(path: Path, intra: int, parallel: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra
    # Without this, the threads of the session that ran last spin on the cores the next one
    # needs (cac-edge turns spinning off for the same reason wherever two encoders take turns).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if parallel:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        options.inter_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def forms(bundle: Path, merged: Path, cores: int) -> dict:
    manifest = tomllib.loads((bundle / "bundle.toml").read_text())
    zs_file, ft_file = bundle / manifest["zero_shot"]["image_encoder"], bundle / manifest["fine_tuned"]["image_encoder"]
    half = max(1, cores // 2)
    full = {"zs": session(zs_file, cores), "ft": session(ft_file, cores)}
    halves = {"zs": session(zs_file, half), "ft": session(ft_file, half)}
    parallel, sequential = session(merged, half, parallel=True), session(merged, cores)

    def run(s, pixels):
        return s.run(None, {INPUT: pixels})

    def concurrent(pixels):
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("ft", run(halves["ft"], pixels)))
        worker.start()
        zs = run(halves["zs"], pixels)
        worker.join()
        return zs[0], result["ft"][0]

    return {
        "ft-alone": lambda p: (None, run(full["ft"], p)[0]),
        "sequential": lambda p: (run(full["zs"], p)[0], run(full["ft"], p)[0]),
        "concurrent": concurrent,
        "one-graph-parallel": lambda p: tuple(run(parallel, p)),
        "one-graph-sequential": lambda p: tuple(run(sequential, p)),
    }


def measure(all_forms: dict, batch: int, rounds: int, size: int) -> dict:
    pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    names = list(all_forms)
    reference = all_forms["sequential"](pixels)
    agreement = {}
    for name in names[1:]:
        zs, ft = all_forms[name](pixels)
        agreement[name] = float(max(np.abs(zs - reference[0]).max(), np.abs(ft - reference[1]).max()))
    for name in names:  # warm-up
        all_forms[name](pixels)
    times = {name: [] for name in names}
    for round_index in range(rounds):
        for offset in range(len(names)):
            name = names[(round_index + offset) % len(names)]
            start = time.perf_counter()
            all_forms[name](pixels)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["ft-alone"])
    return {
        name: {"median_ms": 1e3 * statistics.median(values), "ratio_to_ft_alone": statistics.median(values) / base,
               "max_abs_diff_to_sequential": agreement.get(name, 0.0)}
        for name, values in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path, nargs="?", help="a bundle with image_ft.onnx")
    p.add_argument("--make-vit-b-32-maple", action="store_true",
                   help="build (once) and measure onnx/bench/work/vit-b-32-maple instead of BUNDLE")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads of a full-width session")
    args = p.parse_args(argv)
    if args.make_vit_b_32_maple:
        args.bundle = make_vit_b_32_maple(WORK / "vit-b-32-maple")
    if args.bundle is None:
        p.error("give a BUNDLE or --make-vit-b-32-maple")
    manifest = tomllib.loads((args.bundle / "bundle.toml").read_text())
    if "image_encoder" not in manifest.get("fine_tuned", {}):
        print(f"error: {args.bundle}: no [fine_tuned] image_encoder; export a MaPLe or PromptSRC bundle", file=sys.stderr)
        return 1
    size = int(manifest["preprocess"]["image_size"])
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "both.onnx"
        sharing = one_graph(args.bundle / manifest["zero_shot"]["image_encoder"],
                            args.bundle / manifest["fine_tuned"]["image_encoder"], merged)
        log(f"one graph: {sharing['shared_initializer_bytes'] / 1e6:.1f} MB of weights shared, "
            f"{sharing['own_fine_tuned_initializers']} fine-tuned initializers of its own")
        all_forms = forms(args.bundle, merged, args.cores)
        results = {}
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            log(f"batch {batch}: {args.rounds} rounds")
            results[str(batch)] = measure(all_forms, batch, args.rounds, size)
    report = {"bundle": str(args.bundle), "machine": platform.processor() or platform.machine(), "cores": args.cores,
              "onnxruntime": ort.__version__, "rounds": args.rounds, "sharing": sharing, "batches": results}
    WORK.mkdir(exist_ok=True)
    out = WORK / f"two-encoders-{manifest.get('name', args.bundle.name)}.json"
    out.write_text(json.dumps(report, indent=1))
    for batch, rows in results.items():
        print(f"batch {batch}")
        for name, row in rows.items():
            print(f"  {name:22s} {row['median_ms']:9.2f} ms  {row['ratio_to_ft_alone']:.3f}x ft-alone  "
                  f"(max |Δ| to sequential {row['max_abs_diff_to_sequential']:.1e})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
