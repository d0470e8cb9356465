#!/usr/bin/env python3
"""Regenerates the mini-world demo: pretraining, prompt learning, export, evaluation, report.

    onnx/.venv/bin/python onnx/miniworld/build_demo.py

Stages (all seeds fixed):
  1. pretrain.py: a tiny open_clip CLIP on captioned images of the 70 pretraining-seen classes.
  2. render the evaluation images of all 100 classes (16 shots, 20 validation, 40 test each).
  3. per class split s = 0..4: base = 30 seen classes, validation-new = 15 and test-new = 15
     disjoint held-out classes; CoOp (lr 0.002), CoOp-strong (lr 0.5) and KgCoOp (lr 0.5) on 16
     shots per base class, and MaPLe (maple.py; its lr chosen on split 0's validation, saved as an
     official Dassl checkpoint); each prompt learner exported with onnx/export.py into a bundle
     (MaPLe with --method maple; split 0 CoOp-strong is the committed bundle onnx/demo).
  4. every number from the exported ONNX graphs through onnxruntime; calibration choices (TS
     temperature, CAC variant and parameters) made on base validation and validation-new only
     (the CAC setting on the three CoOp-family variants; MaPLe's rows use that same setting).
  5. onnx/demo/REPORT.md, reliability diagrams, the sample image set, classes.txt, base.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
DEMO = os.path.join(ROOT, "onnx", "demo")
EXPORT = os.path.join(ROOT, "onnx", "export.py")
PY = sys.executable
N_SPLITS = 5
N_BASE, N_VALNEW, N_TESTNEW = 30, 15, 15
SHOTS, N_VAL, N_TEST = 16, 20, 40
PAPER = {"method": "cac", "alpha": 1.10, "k": 15.0, "distance": "logits"}
SAMPLES_PER_CLASS = 4

STAGE_TIMES: dict[str, float] = {}


def stage(name):
    class _T:
        def __enter__(self):
            self.t = time.time()
            print(f"== {name}", flush=True)

        def __exit__(self, *a):
            STAGE_TIMES[name] = STAGE_TIMES.get(name, 0.0) + time.time() - self.t
            print(f"== {name}: {time.time() - self.t:.0f}s", flush=True)
    return _T()


def split_classes(s: int):
    return common.class_split(f"miniworld-split-{s}", N_BASE, N_VALNEW, N_TESTNEW)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse-pretrained", action="store_true",
                    help="skip stage 1 when onnx/miniworld/work/pretrained.pt exists (development only)")
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--splits", type=int, default=N_SPLITS)
    args = ap.parse_args(argv)
    os.makedirs(common.WORK, exist_ok=True)
    t_all = time.time()

    import torch
    torch.set_num_threads(args.threads)
    import pretrain
    ckpt = os.path.join(common.WORK, "pretrained.pt")
    with stage("1 pretrain"):
        if not (args.reuse_pretrained and os.path.exists(ckpt)):
            pa = ["--out", ckpt, "--threads", str(args.threads)]
            if args.pretrain_steps:
                pa += ["--steps", str(args.pretrain_steps)]
            pretrain.main(pa)
    with open(os.path.join(common.WORK, "pretrained.json")) as f:
        pre_info = json.load(f)

    with stage("2 render evaluation images"):
        sets = common.render_evaluation_sets(SHOTS, N_VAL, N_TEST)

    import evaluate
    results = []
    eval_report = evaluate.PreservedEvalReport(DEMO)
    with stage("3 prompt learning + export"):
        for s in range(args.splits):
            base, valnew, testnew = split_classes(s)
            results.append(evaluate.train_and_export(s, base, valnew, testnew, ckpt, sets, args))
    with stage("4 evaluation (onnxruntime)"):
        for r in results:
            evaluate.evaluate_split(r, sets)
        choice = evaluate.choose(results)
        for r in results:
            evaluate.apply_choice(r, choice)
    with stage("5 demo files + report"):
        evaluate.write_demo_files(results[0], DEMO)
        evaluate.write_bundle_calibration(DEMO, choice["cac"])
        evaluate.add_demo_int8_variant(DEMO)
        import select_clear_examples
        select_clear_examples.main()
        eval_report.restore()
        check = evaluate.check_committed_bundle(results[0], ckpt, sets)
        try:
            check["runtime"] = evaluate.runtime_check(results[0], DEMO, choice["cac"])
        except Exception as error:  # the report must still be written
            check["runtime"] = {"error": repr(error)}
        print("runtime check:", check["runtime"], flush=True)
        evaluate.write_report(results, choice, pre_info, STAGE_TIMES, check, DEMO, time.time() - t_all)
    print(f"done in {time.time() - t_all:.0f}s")


if __name__ == "__main__":
    main()
