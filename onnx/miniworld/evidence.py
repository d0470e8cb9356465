#!/usr/bin/env python3
"""Evidence that calibration works where it is needed (onnx/EVIDENCE.md).

    onnx/.venv/bin/python onnx/miniworld/evidence.py            # everything: 3 worlds, report

Three mini-worlds of different kinds (`shapes`: world.py's colour × shape; `glyphs`:
world_glyphs.py, letters in DejaVu typefaces; `scenes`: world_scenes.py, objects on textured
backgrounds), each with its own tiny open_clip CLIP pretrained by pretrain.py on 70 classes (30
held out), context length 32 so that CoOp's 16 context tokens fit (evidence-tiny-clip.json).
Per world (`run --world W`, one process each, all seeds fixed):

  1. pretrain; render 16 shots, 20 validation and 40 test images of every class;
  2. knobs chosen on validation only: CoOp settings are tried in a fixed order (CoOp's own
     defaults first) until one meets the selection criterion (SELECTION below) on most of the 5
     class splits; every tried setting is recorded;
  3. per split: CoOp, KgCoOp and MaPLe with those knobs, each exported with onnx/export.py and
     evaluated through onnxruntime (evaluate.evaluate_split): the logits of every subset are saved.

`report` then chooses the CAC reading on validation (pooled over worlds, splits and methods),
computes every table, the per-split bootstrap intervals and the `cac-edge eval` cross-check, and
writes onnx/EVIDENCE.md and onnx/evidence/results.json. Work files: onnx/miniworld/work/evidence/.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORLDS = {"shapes": "world", "glyphs": "world_glyphs", "scenes": "world_scenes"}
CONFIG = os.path.join(HERE, "evidence-tiny-clip.json")
WORK = os.path.join(HERE, "work", "evidence")
OUT_DIR = os.path.join(ROOT, "onnx", "evidence")
REPORT = os.path.join(ROOT, "onnx", "EVIDENCE.md")
N_SPLITS = 5
N_VALNEW, N_TESTNEW = 15, 15
SHOTS, N_VAL, N_TEST = 16, 20, 40
PRETRAIN_STEPS, PRETRAIN_PER_CLASS = 2000, 400
KG_LAMBDA = 8.0
# Stated before any test number is computed (the report repeats it verbatim): the world shows the
# phenomenon when, on validation-new, CoOp's ECE is at least twice zero-shot's AND CoOp's accuracy
# is below zero-shot's, on at least 3 of the 5 splits (the criterion). A first version also
# required CoOp's base-validation accuracy ≥ zero-shot's; it was dropped, before any test number
# existed, when validation showed the zero-shot prompt already matching 16-shot CoOp on base
# classes in these worlds (the report's selection tables keep both base accuracies).
SELECTION = ("on validation-new, CoOp's ECE ≥ 2 × zero-shot's and CoOp's accuracy < zero-shot's, "
             "on at least 3 of the 5 class splits")
DROPPED_GUARD = ("A first version of the criterion also required CoOp's base-validation accuracy ≥ "
                 "zero-shot's on those splits (to exclude a prompt that failed to train). It was dropped "
                 "after the first knob search, before any test number existed: with it no world met the "
                 "criterion on more than 2 of 5 splits, and a check on the shapes world (splits 0 and 1, each "
                 "learning rate) showed why: the hand-written zero-shot prompt was already 1–5.5 points better "
                 "than 16-shot CoOp on base validation, while CoOp's training loss fell and its "
                 "validation-new ECE was 2.7–7× zero-shot's. The guard excluded trained prompts, not failed "
                 "ones. Both base accuracies stay in the table below.")
# CoOp settings in the order they are tried: CoOp's own defaults (16 context tokens, lr 0.002,
# 200 epochs, 16 shots) on few base classes (10 of the 40 deployed: what makes CoOp overfit on
# real CLIP), then larger learning rates. The first that meets SELECTION is used for CoOp and
# KgCoOp, and its base-class count for MaPLe.
KNOB_ORDER = [
    {"n_base": 10, "n_ctx": 16, "lr": 0.002, "epochs": 200},
    {"n_base": 10, "n_ctx": 16, "lr": 0.05, "epochs": 200},
    {"n_base": 10, "n_ctx": 16, "lr": 0.5, "epochs": 200},
]
KNOB_HISTORY = ("An earlier order began with 30 base classes (CoOp at 30 classes × 16 shots runs 3 000 steps "
                "per split, about 4 min on this machine); it was stopped before its first setting finished, "
                "unevaluated, for compute time.")
MAPLE_LRS = (0.0035, 0.035)
MAPLE_EPOCHS = 100
PAPER = {"method": "cac", "alpha": 1.10, "k": 15.0, "distance": "logits"}
ALPHAS = [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]
K_LOGITS = [1, 2, 3, 5, 8, 10, 15, 20, 30, 50, 100]
K_PROBS = [0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 10]
METHODS = ("coop", "kgcoop", "maple")
METHOD_NAMES = {"coop": "CoOp", "kgcoop": "KgCoOp", "maple": "MaPLe"}
BOOTSTRAP = 1000
if os.environ.get("EVIDENCE_SMOKE"):  # a minutes-long run of every code path (numbers meaningless)
    WORK = os.path.join(HERE, "work", "evidence-smoke")
    REPORT = os.path.join(WORK, "EVIDENCE.md")
    OUT_DIR = WORK
    PRETRAIN_STEPS, PRETRAIN_PER_CLASS, N_SPLITS, MAPLE_EPOCHS, BOOTSTRAP = 20, 10, 3, 2, 20
    KNOB_ORDER = [dict(k, epochs=2) for k in KNOB_ORDER[:2]]


# ---------------------------------------------------------------------------------- per world

def configure(world_name: str):
    """Points common.py at the world and the context-32 config before it is imported."""
    os.environ["MINIWORLD_WORLD"] = WORLDS[world_name]
    os.environ["MINIWORLD_MODEL_CONFIG"] = CONFIG
    os.environ["MINIWORLD_WORK"] = os.path.join(WORK, world_name)
    sys.path.insert(0, HERE)


def split_classes(world, s: int, n_base: int):
    """Split `s` of `world` (the world common.py was pointed at by configure)."""
    import common
    assert common.world is world
    return common.class_split(f"evidence-split-{s}", n_base, N_VALNEW, N_TESTNEW)


def run_world(name: str):
    configure(name)
    import torch
    torch.set_num_threads(1)
    import common
    import pretrain
    import evaluate
    world = common.world
    os.makedirs(common.WORK, exist_ok=True)
    t0 = time.time()
    ckpt = os.path.join(common.WORK, "pretrained.pt")
    if not os.path.exists(ckpt):
        pretrain.main(["--out", ckpt, "--steps", str(PRETRAIN_STEPS), "--per-class", str(PRETRAIN_PER_CLASS), "--threads", "1"])
    with open(os.path.join(common.WORK, "pretrained.json")) as f:
        pre_info = {k: v for k, v in json.load(f).items() if k != "history"}
    sets = common.render_evaluation_sets(SHOTS, N_VAL, N_TEST)
    clip = evaluate.load_clip(ckpt)
    knobs, tried = select_knobs(world, clip, sets)
    print(f"[{name}] knobs {knobs} ({len(tried)} tried) {time.time() - t0:.0f}s", flush=True)
    results, maple_grid = [], []
    for s in range(N_SPLITS):
        base, valnew, testnew = split_classes(world, s, knobs["n_base"])
        r = train_and_export(name, s, base, valnew, testnew, clip, ckpt, sets, knobs, maple_grid)
        evaluate.evaluate_split(r, sets)
        results.append(r)
        print(f"[{name}] split {s} done {time.time() - t0:.0f}s", flush=True)
    save_world(name, results, knobs, tried, maple_grid, pre_info, sets, time.time() - t0)


def select_knobs(world, clip, sets):
    """Tries KNOB_ORDER on validation only (PyTorch features; test images are not touched) and
    returns the first setting that meets SELECTION, else the one meeting it on most splits."""
    import torch
    import torch.nn.functional as F
    import calib
    import coop
    idx = {c: i for i, c in enumerate(world.ALL_CLASSES)}
    with torch.no_grad():
        img = {st: F.normalize(clip.encode_image(torch.from_numpy(sets[st][0])), dim=-1) for st in ("shots", "val", "test")}
        zs_text = F.normalize(clip.encode_text(coop.zs_ids(world.ALL_CLASSES)), dim=-1)
    scale = clip.logit_scale.exp().item()
    tried = []
    for knobs in KNOB_ORDER:
        per_split = []
        for s in range(N_SPLITS):
            base, valnew, _ = split_classes(world, s, knobs["n_base"])
            learner = train_coop(clip, img["shots"], sets["shots"][1], base, idx, s, "coop", knobs)
            row = {}
            for prefix, classes, streams in (("", valnew, ("val", "test")), ("base_", base, ("val",))):
                feats, labels = class_images(img, sets, classes, idx, streams)
                with torch.no_grad():
                    ft_text = F.normalize(learner.encode(coop.ft_ids(classes, knobs["n_ctx"])), dim=-1)
                cids = [idx[c] for c in classes]
                p_zs = calib.softmax(scale * (feats @ zs_text[cids].T).numpy(), 1.0)
                p_ft = calib.softmax(scale * (feats @ ft_text.T).numpy(), 1.0)
                row.update({f"{prefix}zs_ece": calib.ece(p_zs, labels), f"{prefix}coop_ece": calib.ece(p_ft, labels),
                            f"{prefix}zs_acc": float((p_zs.argmax(1) == labels).mean()),
                            f"{prefix}coop_acc": float((p_ft.argmax(1) == labels).mean())})
            row["met"] = bool(row["coop_ece"] >= 2 * row["zs_ece"] and row["coop_acc"] < row["zs_acc"])
            per_split.append(row)
        met = sum(r["met"] for r in per_split)
        tried.append({"knobs": knobs, "splits": per_split, "met_splits": met, "selected": met >= 3})
        print(f"  knobs {knobs}: criterion met on {met}/{N_SPLITS} splits", flush=True)
        if met >= 3:
            return knobs, tried
    best = max(tried, key=lambda t: t["met_splits"])  # first on ties
    return best["knobs"], tried


def class_images(img, sets, classes, idx, streams):
    """Features and labels (indices into `classes`) of every image of `classes` in `streams`.
    Validation-new uses the val and test streams of its classes (as evaluate.SUBSETS["valnew"]):
    those classes are never reported as test classes. Base validation uses the val stream."""
    cids = [idx[c] for c in classes]
    feats, labels = [], []
    for st in streams:
        m = np.flatnonzero(np.isin(sets[st][1], cids))
        feats.append(img[st][m])
        labels.append(np.array([cids.index(int(x)) for x in sets[st][1][m]]))
    import torch
    return torch.cat(feats), np.concatenate(labels)


def base_shots(shot_labels, base, idx):
    import torch
    base_ids = [idx[c] for c in base]
    mask = np.isin(shot_labels, base_ids)
    remap = {ci: j for j, ci in enumerate(base_ids)}
    return mask, torch.tensor([remap[int(x)] for x in shot_labels[mask]])


def train_coop(clip, img_shots, shot_labels, base, idx, s, method, knobs):
    import coop
    mask, labels = base_shots(shot_labels, base, idx)
    return coop.train(clip, img_shots[mask], labels, base, seed=1000 + s, method=method, lr=knobs["lr"],
                      epochs=knobs["epochs"], n_ctx=knobs["n_ctx"], kg_lambda=KG_LAMBDA)


def train_and_export(name, s, base, valnew, testnew, clip, ckpt, sets, knobs, maple_grid, wdir=None):
    import torch
    import torch.nn.functional as F
    import common
    import coop
    import evaluate
    import maple
    world = common.world
    idx = {c: i for i, c in enumerate(world.ALL_CLASSES)}
    wdir = wdir or os.path.join(common.WORK, f"split{s}")
    os.makedirs(wdir, exist_ok=True)
    with torch.no_grad():
        img_shots = F.normalize(clip.encode_image(torch.from_numpy(sets["shots"][0])), dim=-1)
    r = {"split": s, "base": base, "valnew": valnew, "testnew": testnew, "bundles": {}}
    for method in ("coop", "kgcoop"):
        learner = train_coop(clip, img_shots, sets["shots"][1], base, idx, s, method, knobs)
        pl = os.path.join(wdir, f"{method}.safetensors")
        coop.save_prompt_learner(learner, pl, method)
        out_dir = os.path.join(wdir, f"bundle-{method}")
        evaluate.export_bundle(ckpt, pl, out_dir, f"{name}-split{s}-{method}", method)
        r["bundles"][method] = out_dir
    mask, labels = base_shots(sets["shots"][1], base, idx)
    shots = torch.from_numpy(sets["shots"][0][mask])
    if not maple_grid:  # split 0: MaPLe's lr chosen on validation (HM of base-val and val-new accuracy)
        best = None
        for lr in MAPLE_LRS:
            model, info = maple.train(clip, shots, labels, base, seed=1000 + s, lr=lr, epochs=MAPLE_EPOCHS, batch=32)
            hm, acc_b, acc_n = evaluate.maple_validation_hm(model, sets, base, valnew) if info["finite"] else (0.0, 0.0, 0.0)
            maple_grid.append({"lr": lr, "hm": hm, "base_val_acc": acc_b, "valnew_acc": acc_n})
            if best is None or hm > best[0]:
                best = (hm, model)
        model = best[1]
    else:
        lr = max(maple_grid, key=lambda g: g["hm"])["lr"]
        model, _ = maple.train(clip, shots, labels, base, seed=1000 + s, lr=lr, epochs=MAPLE_EPOCHS, batch=32)
    pl_dir = os.path.join(wdir, "maple", "MultiModalPromptLearner")
    os.makedirs(pl_dir, exist_ok=True)
    pl = os.path.join(pl_dir, f"model.pth.tar-{MAPLE_EPOCHS}")
    maple.save_dassl_checkpoint(model, pl, MAPLE_EPOCHS)
    out_dir = os.path.join(wdir, "bundle-maple")
    evaluate.export_bundle(ckpt, pl, out_dir, f"{name}-split{s}-maple", "maple")
    r["bundles"]["maple"] = out_dir
    return r


def save_world(name, results, knobs, tried, maple_grid, pre_info, sets, seconds):
    """Logits of every subset (npz) and the run's facts (json), read by `report`."""
    arrays = {}
    for r in results:
        for method, subs in r["logits"].items():
            for sub, d in subs.items():
                for key, value in d.items():
                    arrays[f"s{r['split']}/{method}/{sub}/{key}"] = np.asarray(value)
    np.savez_compressed(os.path.join(WORK, name, "logits.npz"), **arrays)
    meta = {"world": name, "knobs": knobs, "tried": tried, "maple_grid": maple_grid, "pretrain": pre_info,
            "seconds": round(seconds), "splits": [{"split": r["split"], "base": r["base"], "valnew": r["valnew"],
                                                   "testnew": r["testnew"], "temperature": r["temperature"],
                                                   "bundles": r["bundles"]} for r in results]}
    with open(os.path.join(WORK, name, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def check_reproducible(name: str):
    """Trains, exports and evaluates split 0 of a finished world again, in a scratch directory,
    and compares every logit with the saved ones (exact equality)."""
    configure(name)
    import torch
    torch.set_num_threads(1)
    import common
    import evaluate
    meta = load_world(name)
    sp = meta["splits"][0]
    sets = common.render_evaluation_sets(SHOTS, N_VAL, N_TEST)
    clip = evaluate.load_clip(os.path.join(common.WORK, "pretrained.pt"))
    r = train_and_export(name, 0, sp["base"], sp["valnew"], sp["testnew"], clip, os.path.join(common.WORK, "pretrained.pt"),
                         sets, meta["knobs"], [], wdir=os.path.join(common.WORK, "repro-split0"))
    evaluate.evaluate_split(r, sets)
    compared, differing = 0, []
    for method, subs in r["logits"].items():
        for sub, d in subs.items():
            for key, value in d.items():
                compared += 1
                if not np.array_equal(np.asarray(value), sp["logits"][method][sub][key]):
                    differing.append(f"{method}/{sub}/{key}")
    print(f"[{name}] split 0 rerun: {compared} arrays compared, {len(differing)} differ {differing}")
    return not differing


# ---------------------------------------------------------------------------------- the report

SUBSET_KEYS = ("l_zs", "l_ft", "labels", "dac")
VIEWS = {"base_test": "test base (base test images among base classes)",
         "testnew": "test-new (test-new images among test-new classes)",
         "deployed": "deployment (base and test-new test images among all deployed classes at once)"}


def load_world(name):
    with open(os.path.join(WORK, name, "meta.json")) as f:
        meta = json.load(f)
    z = np.load(os.path.join(WORK, name, "logits.npz"))
    for sp in meta["splits"]:
        s = sp["split"]
        sp["logits"] = {m: {sub: {k.split("/")[-1]: z[k] for k in z.files if k.startswith(f"s{s}/{m}/{sub}/")}
                            for sub in ("base_val", "valnew", "base_test", "testnew", "deployed")} for m in METHODS}
    return meta


def calibrator_settings(chosen):
    return [("none", {"method": "none"}), ("TS", {"method": "ts"}), ("DAC", {"method": "dac"}),
            ("CAC paper", PAPER), ("CAC chosen", chosen)]


def with_temperature(m, sp, method):
    needs_t = m["method"] == "ts" or m.get("over_ts")
    return dict(m, temperature=sp["temperature"][method]) if needs_t else m


def probabilities(d, m, sp, method):
    import calib
    if m is None:  # zero-shot CLIP
        return calib.softmax(d["l_zs"], 1.0)
    m = with_temperature(m, sp, method)
    return calib.softmax(d["l_ft"], calib.weights(m, d["l_ft"], d["l_zs"], d["dac"]))


def scores(probs, labels):
    import calib
    return {"acc": float((probs.argmax(1) == labels).mean()), "ece": calib.ece(probs, labels),
            "ace": calib.ace(probs, labels), "nll": calib.nll_clipped(probs, labels), "conf": float(probs.max(1).mean())}


# --- the CAC reading, chosen on validation


def reading_grid():
    """Every CAC reading tried: distance (logits, probs), α, k, the sign of the contrast term,
    stacking on TS, and λ1/λ2 thresholds (fixed values per distance)."""
    lambdas = {"logits": [None, (1.0, 1e9), (0.0, 5.0)], "probs": [None, (0.1, 1e9), (0.0, 1.0)]}
    for distance, ks in (("logits", K_LOGITS), ("probs", K_PROBS)):
        for a, k, sign, over_ts, lam in itertools.product(ALPHAS, ks, (-1, 1), (False, True), lambdas[distance]):
            m = {"method": "cac", "alpha": a, "k": float(k), "distance": distance}
            if sign == 1:
                m["sign"] = 1
            if over_ts:
                m["over_ts"] = True
            if lam is not None:
                m["thresholds"] = lam
            yield m


class FastConfidence:
    """Top-label confidences and correctness of one subset under any weight w, without the full
    softmax: conf = 1 / Σ_c exp(w (l_c − l_max)); the argmax does not depend on w."""

    def __init__(self, d, sp, method):
        import calib
        self.l_ft, self.l_zs, self.dac = d["l_ft"].astype(np.float64), d["l_zs"], d["dac"]
        self.shifted = self.l_ft - self.l_ft.max(axis=1, keepdims=True)
        self.correct = (calib.argmax(self.l_ft) == d["labels"]).astype(np.float64)
        self.contrast = {"logits": calib.logit_contrast(self.l_ft, self.l_zs),
                         "probs": calib.probability_contrast(self.l_ft, self.l_zs)}
        self.temperature = sp["temperature"][method]

    def ece(self, m):
        import calib
        w = calib.cac_weight(self.contrast[m["distance"]], m["alpha"], m["k"], m.get("thresholds"), m.get("sign", -1))
        if m.get("over_ts"):
            w = w / self.temperature
        conf = 1.0 / np.exp(w[:, None] * self.shifted).sum(axis=1)
        idx = calib.bin_index(conf)  # Σ_b n_b |acc_b − conf_b| / n = Σ_b |Σ correct − Σ conf| / n
        return float(np.abs(np.bincount(idx, self.correct, 15) - np.bincount(idx, conf, 15)).sum() / len(conf))


def choose_reading(worlds):
    """The CAC reading with the lowest validation objective: the mean over worlds, splits and the
    three prompt learners of (ECE on base validation + ECE on validation-new) / 2."""
    subsets = [(FastConfidence(sp["logits"][m]["base_val"], sp, m), FastConfidence(sp["logits"][m]["valnew"], sp, m))
               for w in worlds for sp in w["splits"] for m in METHODS]
    grid = []
    for m in reading_grid():
        grid.append((float(np.mean([(a.ece(m) + b.ece(m)) / 2 for a, b in subsets])), m))
    grid.sort(key=lambda g: g[0])
    runtime = [g for g in grid if "sign" not in g[1] and "over_ts" not in g[1]]
    return {"best": grid[0], "best_runtime": runtime[0], "top": grid[:12], "size": len(grid),
            "paper": next(g for g in grid if g[1] == PAPER),
            "by_reading": best_per_reading(grid)}


def best_per_reading(grid):
    out = {}
    for obj, m in grid:
        key = (m["distance"], "sign +" if m.get("sign") == 1 else "sign −", "on TS" if m.get("over_ts") else "alone",
               "λ" if "thresholds" in m else "no λ")
        out.setdefault(" / ".join(key), (obj, m))
    return out


def validation_objective(worlds, m):
    import calib
    vals = [(calib.ece(probabilities(sp["logits"][meth]["base_val"], m, sp, meth), sp["logits"][meth]["base_val"]["labels"])
             + calib.ece(probabilities(sp["logits"][meth]["valnew"], m, sp, meth), sp["logits"][meth]["valnew"]["labels"])) / 2
            for w in worlds for sp in w["splits"] for meth in METHODS]
    return float(np.mean(vals))


# --- tables and significance


def world_tables(w, chosen):
    """{view: [(row label, [scores per split])]}: zero-shot, then each method × calibrator."""
    tables = {}
    for view in VIEWS:
        rows = [("Zero-shot CLIP", [scores(probabilities(sp["logits"]["coop"][view], None, sp, "coop"),
                                           sp["logits"]["coop"][view]["labels"]) for sp in w["splits"]])]
        for meth in METHODS:
            for cal_name, m in calibrator_settings(chosen):
                label = METHOD_NAMES[meth] + ("" if cal_name == "none" else f" + {cal_name}")
                rows.append((label, [scores(probabilities(sp["logits"][meth][view], m, sp, meth),
                                            sp["logits"][meth][view]["labels"]) for sp in w["splits"]]))
        tables[view] = rows
    return tables


def bootstrap_ece_difference(pa, pb, labels, seed):
    """Paired bootstrap over images of ECE(a) − ECE(b): (observed, 2.5 %, 97.5 %)."""
    import calib
    rng = np.random.default_rng(seed)
    n = len(labels)
    diffs = np.empty(BOOTSTRAP)
    for i in range(BOOTSTRAP):
        idx = rng.integers(0, n, n)
        diffs[i] = calib.ece(pa[idx], labels[idx]) - calib.ece(pb[idx], labels[idx])
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return calib.ece(pa, labels) - calib.ece(pb, labels), float(lo), float(hi)


COMPARISONS = [("CAC chosen", "none"), ("CAC chosen", "TS"), ("CAC chosen", "DAC"), ("CAC paper", "none"),
               ("TS", "none"), ("DAC", "none")]


def significance(w, chosen, view="testnew"):
    """Per method and comparison: per split (Δ ECE, CI) and the verdict counts, and a paired t-test
    of the per-split ECEs (5 pairs)."""
    from scipy.stats import ttest_rel
    settings = dict(calibrator_settings(chosen))
    out = {}
    for mi, meth in enumerate(METHODS):
        for ci, (a, b) in enumerate(COMPARISONS):
            per = []
            for sp in w["splits"]:
                d = sp["logits"][meth][view]
                seed = hash_seed(w["world"], sp["split"], meth, a, b, view)
                per.append(bootstrap_ece_difference(probabilities(d, settings[a], sp, meth),
                                                    probabilities(d, settings[b], sp, meth), d["labels"], seed))
            obs = np.array([p[0] for p in per])
            wins = sum(p[2] < 0 for p in per)
            losses = sum(p[1] > 0 for p in per)
            t = ttest_rel(obs, np.zeros_like(obs)) if np.ptp(obs) > 0 else None
            out[(meth, a, b)] = {"per_split": per, "wins": wins, "losses": losses, "ties": len(per) - wins - losses,
                                 "mean": float(obs.mean()), "std": float(obs.std(ddof=1)),
                                 "p": float(t.pvalue) if t is not None else float("nan")}
    return out


def hash_seed(*parts):
    import hashlib
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


# --- the runtime cross-check


def runtime_binary():
    return os.environ.get("CAC_EDGE") or next(
        (p for p in (os.path.join(ROOT, "target", "release", "cac-edge"), os.path.join(ROOT, "target", "debug", "cac-edge"))
         if os.path.exists(p)), None)


def crosscheck(w, chosen, method="coop"):
    """`cac-edge eval` on every split's `method` bundle of world `w`, over the same test images as
    the deployment view (base and test-new test images, all deployed classes), with the Python TS
    temperature given: its numbers against the Python ones, calibrator by calibrator."""
    binary = runtime_binary()
    if binary is None:
        return {"error": "no cac-edge binary (cargo build --release)"}
    configure(w["world"])
    import common
    runtime_reading = chosen if "sign" not in chosen and "over_ts" not in chosen else None
    splits = []
    for sp in w["splits"]:
        done = crosscheck_split(binary, common.world, w["world"], sp, method, runtime_reading)
        if "error" in done:
            return done
        splits.append(done)
    return {"world": w["world"], "method": method, "splits": splits, "command": splits[0]["command"],
            "reading": ("the chosen reading, given with --cac-* flags (the row `requested`)" if runtime_reading is not None
                        else "not in the runtime (sign or TS term), so only the paper's")}


def crosscheck_split(binary, world, world_name, sp, method, runtime_reading):
    out_dir = os.path.join(WORK, world_name, "crosscheck", f"split{sp['split']}")
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    lines = ["path,label"]
    for c in sp["base"] + sp["testnew"]:  # the "test" stream (seed 1): the bytes the Python evaluation decoded
        for i in range(N_TEST):
            jpeg, _ = world.render_jpeg(c, world.image_rng(1, c, i, "test"))
            rel = f"{c.replace(' ', '_')}/{i:02d}.jpg"
            os.makedirs(os.path.join(img_dir, os.path.dirname(rel)), exist_ok=True)
            with open(os.path.join(img_dir, rel), "wb") as f:
                f.write(jpeg)
            lines.append(f"{rel},{c}")
    with open(os.path.join(img_dir, "labels.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    for name, classes in (("classes.txt", sp["base"] + sp["valnew"] + sp["testnew"]), ("base.txt", sp["base"])):
        with open(os.path.join(out_dir, name), "w") as f:
            f.write("\n".join(classes) + "\n")
    bundle, cache = sp["bundles"][method], os.path.join(out_dir, "cache.safetensors")
    temperature = sp["temperature"][method]
    cac_args = []
    if runtime_reading is not None:
        m = runtime_reading
        cac_args = ["--calibration", "cac", "--cac-alpha", repr(m["alpha"]), "--cac-k", repr(m["k"]), "--cac-distance", m["distance"]]
        if "thresholds" in m:
            cac_args += ["--cac-lambda1", repr(m["thresholds"][0]), "--cac-lambda2", repr(m["thresholds"][1])]
    common_args = ["--device", "cpu", "--threads", "1"]
    report_dir = os.path.join(out_dir, "eval-report")
    cmd = [binary, "eval", "--bundle", bundle, "--cache", cache, "--images", os.path.join(img_dir, "labels.csv"),
           "--temperature", repr(temperature), *cac_args, "--out", report_dir, *common_args]
    for args in ([binary, "cache", "build", "--bundle", bundle, "--classes", os.path.join(out_dir, "classes.txt"),
                  "--base", os.path.join(out_dir, "base.txt"), "--output", cache, *common_args], cmd):
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": f"`{' '.join(args)}` failed: {done.stderr.strip()}"}
    with open(os.path.join(report_dir, "report.json")) as f:
        report = json.load(f)
    d = sp["logits"][method]["deployed"]
    new = d["is_new_image"].astype(bool)
    settings = {"none": {"method": "none"}, "ts": {"method": "ts"}, "dac": {"method": "dac"}, "cac-paper": PAPER}
    if runtime_reading is not None:
        settings["requested"] = runtime_reading
    rows = []
    for cal in report["calibrators"]:
        if cal["name"] not in settings:
            continue
        probs = probabilities(d, settings[cal["name"]], sp, method)
        for group in cal["splits"]:
            mask = {"base": ~new, "new": new, "all": np.ones_like(new)}[group["split"]]
            py = scores(probs[mask], d["labels"][mask])
            rows.append({"calibrator": cal["name"], "group": group["split"], "images": group["images"],
                         "runtime": {"acc": group["accuracy_percent"], "ece": group["ece_percent"],
                                     "ace": group["ace_percent"], "nll": group["nll"]},
                         "python": {"acc": 100 * py["acc"], "ece": 100 * py["ece"], "ace": 100 * py["ace"], "nll": py["nll"]}})
    rel_cmd = " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) else c for c in cmd)
    return {"split": sp["split"], "rows": rows, "command": rel_cmd, "images": int(len(d["labels"])), "temperature": temperature}


# --- writing


def reliability_figure(worlds, chosen, path, method="coop", view="testnew"):
    """Reliability diagrams of `method` on `view`, every split's images pooled: one row per world,
    one column per calibrator (zero-shot first)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import calib
    columns = [("zero-shot", None)] + calibrator_settings(chosen)
    fig, axes = plt.subplots(len(worlds), len(columns), figsize=(1.9 * len(columns), 2.0 * len(worlds)),
                             sharex=True, sharey=True, squeeze=False)
    centers = (np.arange(15) + 0.5) / 15
    for i, w in enumerate(worlds):
        for j, (name, m) in enumerate(columns):
            probs = np.concatenate([probabilities(sp["logits"][method][view], m, sp, method) for sp in w["splits"]])
            labels = np.concatenate([sp["logits"][method][view]["labels"] for sp in w["splits"]])
            rel = calib.reliability(probs, labels)
            ax = axes[i, j]
            ax.bar(centers, np.nan_to_num([r[2] for r in rel]), width=1 / 15, edgecolor="k", linewidth=0.3, color="#4c72b0")
            ax.plot([0, 1], [0, 1], "r--", linewidth=0.8)
            title = name if m is None else f"{METHOD_NAMES[method]} {name}"
            ax.set_title(f"{w['world']}: {title}\nECE {100 * calib.ece(probs, labels):.1f}", fontsize=6)
            ax.tick_params(labelsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def ms(vals, scale=100.0, digits=1):
    v = np.asarray(vals, dtype=np.float64) * scale
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def describe(m):
    if m is None:
        return "zero-shot"
    if m["method"] != "cac":
        return {"none": "none", "ts": "TS", "dac": "DAC"}[m["method"]]
    parts = [f"α={m['alpha']:g}", f"k={m['k']:g}", f"{m['distance']} distance"]
    if m.get("sign") == 1:
        parts.append("sign + (exp(+d/k))")
    if "thresholds" in m:
        parts.append(f"λ1={m['thresholds'][0]:g}, λ2={'∞' if m['thresholds'][1] >= 1e9 else format(m['thresholds'][1], 'g')}")
    if m.get("over_ts"):
        parts.append("stacked on TS (× 1/T)")
    return "CAC " + ", ".join(parts)


def cli_flags(m):
    flags = f"--calibration cac --cac-alpha {m['alpha']:g} --cac-k {m['k']:g} --cac-distance {m['distance']}"
    if "thresholds" in m:
        flags += f" --cac-lambda1 {m['thresholds'][0]:g} --cac-lambda2 {m['thresholds'][1]:g}"
    return flags


def selection_section(w):
    L = [f"Selection criterion (stated before any test number was computed): **{SELECTION}**. {DROPPED_GUARD}", ""]
    L.append("| n_base | n_ctx | lr | epochs | per split: val-new ECE zero-shot → CoOp (val-new acc zero-shot → CoOp; base-val acc zero-shot → CoOp), met? | met on |")
    L.append("|---|---|---|---|---|---|")
    for t in w["tried"]:
        k = t["knobs"]
        cells = "; ".join(f"{100 * r['zs_ece']:.1f}→{100 * r['coop_ece']:.1f} ({100 * r['zs_acc']:.0f}→{100 * r['coop_acc']:.0f}; "
                          f"{100 * r['base_zs_acc']:.0f}→{100 * r['base_coop_acc']:.0f}) "
                          f"{'✓' if r['met'] else '✗'}" for r in t["splits"])
        L.append(f"| {k['n_base']} | {k['n_ctx']} | {k['lr']:g} | {k['epochs']} | {cells} | {t['met_splits']}/{N_SPLITS} |")
    L += ["", f"Knobs tried in a fixed order, stopping at the first that meets the criterion. {KNOB_HISTORY}"]
    met = any(t["selected"] for t in w["tried"])
    k = w["knobs"]
    L.append("")
    L.append(f"**Criterion {'met' if met else 'NOT met'} on validation.** Used: {k['n_base']} base classes, "
             f"{k['n_ctx']} context tokens, lr {k['lr']:g}, {k['epochs']} epochs"
             + ("" if met else " (the setting meeting it on the most splits; the world does not show the phenomenon "
                               "as strongly as required, so its tables are reported but weigh less)") + ".")
    grid = ", ".join(f"lr {g['lr']:g}: HM {100 * g['hm']:.1f}" for g in w["maple_grid"])
    L.append(f"MaPLe: N_CTX 2, depth 2, {MAPLE_EPOCHS} epochs, lr {max(w['maple_grid'], key=lambda g: g['hm'])['lr']:g} "
             f"chosen on split 0 validation ({grid}).")
    return L


def table_section(tables, view):
    L = [f"| {VIEWS[view].split(' (')[0]} | acc | ECE | ACE | NLL |", "|---|---|---|---|---|"]
    for label, per in tables[view]:
        L.append(f"| {label} | {ms([p['acc'] for p in per])} | {ms([p['ece'] for p in per])} | "
                 f"{ms([p['ace'] for p in per])} | {ms([p['nll'] for p in per], 1.0, 3)} |")
    return L


def significance_section(sig):
    L = ["| method | comparison (test-new ECE, a − b) | " + " | ".join(f"split {s}" for s in range(N_SPLITS))
         + " | mean ± std | wins / ties / losses | paired t p |", "|---|---|" + "---|" * (N_SPLITS + 3)]
    for (meth, a, b), r in sig.items():
        cells = []
        for obs, lo, hi in r["per_split"]:
            mark = " ✓" if hi < 0 else (" ✗" if lo > 0 else "")
            cells.append(f"{100 * obs:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}")
        L.append(f"| {METHOD_NAMES[meth]} | {a} − {b} | " + " | ".join(cells) +
                 f" | {100 * r['mean']:+.1f} ± {100 * r['std']:.1f} | {r['wins']} / {r['ties']} / {r['losses']} | {r['p']:.3f} |")
    return L


def crosscheck_section(cc):
    if "error" in cc:
        return [f"The runtime cross-check did not run: {cc['error']}."]
    first = cc["splits"][0]
    L = [f"`cac-edge eval` on world **{cc['world']}**, the {METHOD_NAMES[cc['method']]} bundle of every split, over the "
         f"deployment view's images ({first['images']} test images per split, base and test-new, every deployed class "
         f"at once), each split's TS temperature (the Python fit) given with `--temperature`; CAC chosen: {cc['reading']}. "
         "Split 0's command:", "", "```sh", first["command"], "```", "",
         "Mean ± std over splits, runtime (its own JPEG decoding, resize, tokenizer, cache and calibration) and Python "
         "(Pillow + open_clip's transform, onnxruntime, numpy):", "",
         "| calibrator (images) | acc runtime | acc Python | ECE runtime | ECE Python | ACE runtime | ACE Python | NLL runtime | NLL Python |",
         "|---|---|---|---|---|---|---|---|---|"]
    keys = [(r["calibrator"], r["group"]) for r in first["rows"]]
    for j, (cal, group) in enumerate(keys):
        per = [sp["rows"][j] for sp in cc["splits"]]
        cells = []
        for k, digits in (("acc", 2), ("ece", 2), ("ace", 2), ("nll", 4)):
            cells += [ms([p[side][k] for p in per], 1.0, digits) for side in ("runtime", "python")]
        L.append(f"| {cal} ({group}) | " + " | ".join(cells) + " |")
    rows = [r for sp in cc["splits"] for r in sp["rows"]]
    d = {k: max(abs(r["runtime"][k] - r["python"][k]) for r in rows) for k in ("acc", "ece", "ace", "nll")}
    mean_d = {k: float(np.mean([abs(r["runtime"][k] - r["python"][k]) for r in rows])) for k in ("ece", "nll")}
    L += ["", f"Runtime − Python over every split, calibrator and group ({len(rows)} rows): largest |Δ| accuracy "
              f"{d['acc']:.2f} points, ECE {d['ece']:.2f} (mean {mean_d['ece']:.2f}), ACE {d['ace']:.2f}, NLL {d['nll']:.4f} "
              f"(mean {mean_d['nll']:.4f}). The two paths share the exported graphs; they differ in JPEG decoding and "
              "resizing (the runtime's decoder and resize against Pillow and open_clip's transform), which on 32-px "
              "inputs moves a few near-tied predictions and, through the logit scale, the confidences."]
    cc["max_diff"] = d
    return L


def verdicts(worlds, sigs):
    """Plain sentences read off the significance tables (pooled over worlds and methods)."""
    L = []
    for a, b in COMPARISONS:
        rs = [sig[(m, a, b)] for sig in sigs.values() for m in METHODS]
        wins, losses = sum(r["wins"] for r in rs), sum(r["losses"] for r in rs)
        n = sum(len(r["per_split"]) for r in rs)
        mean = 100 * np.mean([r["mean"] for r in rs])
        L.append(f"- **{a} vs {b}** on test-new ECE, over {len(worlds)} worlds × {len(METHODS)} prompt learners × "
                 f"{N_SPLITS} splits = {n} split-level comparisons: mean Δ {mean:+.2f} points; lower with a 95 % "
                 f"bootstrap interval below 0 on {wins}, higher with one above 0 on {losses}, indistinguishable on "
                 f"{n - wins - losses}.")
    return L


def report(run_crosscheck=True, demo=False):
    sys.path.insert(0, HERE)
    worlds = [load_world(name) for name in WORLDS if os.path.exists(os.path.join(WORK, name, "meta.json"))]
    choice = choose_reading(worlds)
    chosen = choice["best"][1]
    candidates = [("none", {"method": "none"}), ("TS", {"method": "ts"}), ("DAC", {"method": "dac"}),
                  ("CAC paper defaults", PAPER), ("best runtime reading", choice["best_runtime"][1]),
                  ("best reading overall", chosen)]
    cand = [(label, m, validation_objective(worlds, m)) for label, m in candidates]
    tables = {w["world"]: world_tables(w, chosen) for w in worlds}
    sigs = {w["world"]: significance(w, chosen) for w in worlds}
    shown, ratios = demo_world(worlds)
    if demo:
        build_demo(shown, choice["best_runtime"][1], tables[shown["world"]])
    cc = crosscheck(shown, chosen) if run_crosscheck else {"error": "skipped (--no-crosscheck)"}
    L = ["# Evidence: does calibration fix the over-confidence fine-tuning causes on new classes?", "",
         "Generated by `onnx/.venv/bin/python onnx/miniworld/evidence.py` (do not edit by hand); numbers in "
         "`onnx/evidence/results.json`. Protocol: `onnx/miniworld/evidence.py`'s docstring.", ""]
    L += ["## Protocol", "",
          f"- **Worlds**: {', '.join(w['world'] for w in worlds)} — 100 classes each named by English phrases "
          "through the real CLIP tokenizer; a tiny open_clip CLIP (ViT 128 × 3 layers on 32 px, text 64 × 2 layers, "
          "context 32) pretrained per world by the same `pretrain.py` on 70 classes; 30 are held out of pretraining.",
          f"- **Splits**: {N_SPLITS} per world; base classes drawn from the 70 pretrained ones, validation-new "
          f"({N_VALNEW}) and test-new ({N_TESTNEW}) disjoint, from the 30 held-out ones. Images per class: {SHOTS} shots, "
          f"{N_VAL} validation, {N_TEST} test.",
          "- **Prompt learners**: CoOp and KgCoOp (λ 8) with the knobs chosen per world on validation (below), "
          "MaPLe (text + image prompts) with its lr chosen on split 0 validation; every one exported with "
          "`onnx/export.py` and **every number computed from the exported ONNX graphs through onnxruntime**.",
          "- **Calibrators**: none; TS (T fitted on base validation, per split and learner); DAC (K 5); CAC with the "
          "paper's defaults (α 1.10, k 15, logit distance); CAC with the reading chosen on validation (below).",
          "- **Metrics**: top-label ECE (15 equal-width bins, right-closed), ACE (15 equal-mass bins), NLL, accuracy; "
          "% except NLL; mean ± std over splits. Base: base test images among base classes; test-new: test-new images "
          "among test-new classes; deployment: both among every deployed class at once (base + validation-new + test-new).",
          f"- **Significance**: per split, a paired bootstrap ({BOOTSTRAP} resamples of the test images, fixed seeds) of the "
          "test-new ECE difference; ✓ marks a 95 % interval wholly below 0 (a win for the first), ✗ wholly above; a "
          f"paired t-test over the {N_SPLITS} splits beside it.",
          "- **Choices** (knobs, MaPLe's lr, TS, the CAC reading) use base validation and validation-new only; "
          "test-new classes and test images are never looked at before the tables below are written.", ""]
    L += ["## The CAC reading chosen on validation", "",
          f"Objective: mean over worlds, splits and the three prompt learners of (ECE base-val + ECE val-new) / 2. "
          f"{choice['size']} readings tried: distance (logits, probs) × α {ALPHAS} × k (logits {K_LOGITS}; probs "
          f"{K_PROBS}) × sign of the contrast term (exp(−d/k), the runtime's; exp(+d/k)) × alone or stacked on TS "
          "(× 1/T) × λ thresholds (none, λ1 only, λ2 only).", "",
          "| candidate | validation objective (ECE %) |", "|---|---|"]
    L += [f"| {label}" + (f": {describe(m)}" if m["method"] == "cac" else "") + f" | {100 * obj:.2f} |" for label, m, obj in cand]
    L += ["", "Best of each reading family:", "", "| reading | best setting | objective |", "|---|---|---|"]
    L += [f"| {key} | {describe(m)} | {100 * obj:.2f} |" for key, (obj, m) in sorted(choice["by_reading"].items(), key=lambda kv: kv[1][0])]
    L += ["", f"**Chosen: {describe(chosen)}** (\"CAC chosen\" in every table below).", ""]
    L += ["## Headline: test-new ECE (%), mean ± std over splits", "",
          "| world | zero-shot | " + " | ".join(f"{METHOD_NAMES[m]} {c}" for m in METHODS for c in ("none", "TS", "DAC", "CAC paper", "CAC chosen")) + " |",
          "|---|---|" + "---|" * (5 * len(METHODS))]
    for w in worlds:
        rows = dict(tables[w["world"]]["testnew"])
        cells = [ms([p["ece"] for p in rows["Zero-shot CLIP"]])]
        for m in METHODS:
            for c in ("none", "TS", "DAC", "CAC paper", "CAC chosen"):
                label = METHOD_NAMES[m] + ("" if c == "none" else f" + {c}")
                cells.append(ms([p["ece"] for p in rows[label]]))
        L.append(f"| {w['world']} | " + " | ".join(cells) + " |")
    L += ["", "What the significance tables say, pooled:", ""] + verdicts(worlds, sigs) + [""]
    for w in worlds:
        L += [f"## World: {w['world']}", "",
              f"Pretraining: {w['pretrain']['steps']} steps × batch {w['pretrain']['batch']}, final logit scale "
              f"{w['pretrain']['final_logit_scale']:.1f}; the whole world took {w['seconds']} s.", ""]
        L += selection_section(w) + [""]
        for view in VIEWS:
            L += [f"### {VIEWS[view]}", ""] + table_section(tables[w["world"]], view) + [""]
        L += ["### Per-split significance (test-new ECE difference, points, [95 % bootstrap interval])", ""]
        L += significance_section(sigs[w["world"]]) + [""]
        L += ["TS temperatures per split: " + "; ".join(
            ", ".join(f"{METHOD_NAMES[m]} {sp['temperature'][m]:.2f}" for m in METHODS) for sp in w["splits"]) + ".", ""]
    L += ["## The runtime gives the same numbers", ""] + crosscheck_section(cc) + [""]
    L += ["## The demo", "",
          "The demo world is chosen on validation: among the worlds meeting the selection criterion, the one where "
          "CoOp's validation-new ECE is the largest multiple of zero-shot's (" +
          ", ".join(f"{name} {r:.2f}×" for name, r in ratios.items()) + f"): **{shown['world']}**, its "
          f"split-{DEMO_SPLIT} {METHOD_NAMES[DEMO_METHOD]} bundle with the best runtime reading "
          f"({describe(choice['best_runtime'][1])}) as its `[calibration]`. `evidence.py report --demo` builds it into "
          "`onnx/demo`; **it is not the committed demo yet**: the demo also ships an int8 image encoder, and "
          "`onnx/quantize.py`'s parity gate refused the int8-dynamic copy of this model (label agreement with fp32 "
          "96.8 % on the demo images, bound 99 %), which the tests of the int8 path are built on.", ""]
    os.makedirs(OUT_DIR, exist_ok=True)
    figure = os.path.join(OUT_DIR, "reliability-testnew.png")
    reliability_figure(worlds, chosen, figure)
    L[L.index("What the significance tables say, pooled:"):L.index("What the significance tables say, pooled:")] = [
        f"![CoOp on test-new images, every split pooled]({os.path.relpath(figure, os.path.dirname(REPORT))})", ""]
    with open(REPORT, "w") as f:
        f.write("\n".join(L) + "\n")
    results = {"chosen": chosen, "candidates": [{"label": l, "setting": m, "objective": o} for l, m, o in cand],
               "worlds": {w["world"]: {"knobs": w["knobs"], "criterion_met": any(t["selected"] for t in w["tried"]),
                                       "tables": {view: {label: {k: [p[k] for p in per] for k in ("acc", "ece", "ace", "nll")}
                                                         for label, per in tables[w["world"]][view]} for view in VIEWS},
                                       "significance": {" | ".join(k): {kk: v for kk, v in r.items()} for k, r in sigs[w["world"]].items()}}
                          for w in worlds},
               "crosscheck": cc}
    with open(os.path.join(OUT_DIR, "results.json"), "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    print(f"wrote {REPORT}")


# ---------------------------------------------------------------------------------- the demo

DEMO = os.path.join(ROOT, "onnx", "demo")
DEMO_METHOD, DEMO_SPLIT = "coop", 0


def demo_world(worlds):
    """The world the demo ships, chosen on validation only: among the worlds whose selected knobs
    meet SELECTION, the one where CoOp's validation-new ECE is the largest multiple of
    zero-shot's (mean over splits); the first world on ties, or if none meets it."""
    def ratio(w):
        t = next(t for t in w["tried"] if t["knobs"] == w["knobs"])
        return float(np.mean([r["coop_ece"] / max(r["zs_ece"], 1e-9) for r in t["splits"]]))
    met = [w for w in worlds if any(t["selected"] for t in w["tried"])]
    return max(met, key=ratio) if met else worlds[0], {w["world"]: ratio(w) for w in worlds}


def build_demo(w, reading, tables):
    """onnx/demo from world `w`'s split-0 CoOp prompt learner: exported again by onnx/export.py
    (the same file, so the same graphs as in the study), the sample and validation images, the
    chosen CAC reading as the bundle's [calibration], the int8 variant and clear.csv."""
    configure(w["world"])
    import common
    import evaluate
    import select_clear_examples
    sp = w["splits"][DEMO_SPLIT]
    wdir = os.path.join(common.WORK, f"split{DEMO_SPLIT}")
    preserved = evaluate.PreservedEvalReport(DEMO)
    evaluate.export_bundle(os.path.join(common.WORK, "pretrained.pt"), os.path.join(wdir, f"{DEMO_METHOD}.safetensors"),
                           DEMO, "miniworld-demo", DEMO_METHOD)
    evaluate.write_demo_files(sp, DEMO)
    evaluate.write_bundle_calibration(DEMO, reading)
    evaluate.add_demo_int8_variant(DEMO)
    select_clear_examples.main()
    preserved.restore()
    write_demo_report(w, reading, tables)


def write_demo_report(w, reading, tables):
    sp = w["splits"][DEMO_SPLIT]
    n_classes = len(sp["base"]) + len(sp["valnew"]) + len(sp["testnew"])
    L = ["# The demo bundle", "",
         "Generated by `onnx/.venv/bin/python onnx/miniworld/evidence.py` (do not edit by hand).", "",
         f"The demo is the **{w['world']}** world of the evidence study ([onnx/EVIDENCE.md](../EVIDENCE.md)), split "
         f"{DEMO_SPLIT}, {METHOD_NAMES[DEMO_METHOD]}: the world chosen on validation as the one where fine-tuning "
         "miscalibrates new classes the most (the selection rule is in `evidence.py`, `demo_world`). "
         f"{len(sp['base'])} base classes (the prompt was trained on these), {len(sp['valnew'])} validation-new and "
         f"{len(sp['testnew'])} test-new classes, all {n_classes} deployed by name. Knobs: "
         f"{w['knobs']['n_ctx']} context tokens, lr {w['knobs']['lr']:g}, {w['knobs']['epochs']} epochs, 16 shots.", "",
         f"Its calibration (`bundle.toml` `[calibration]`): **{describe(reading)}**, the runtime reading chosen on "
         "validation across all three worlds.", "",
         f"## This split's numbers (test images; the study reports all {N_SPLITS} splits)", "",
         "| calibrator | test base ECE | test-new ECE | deployment ECE | deployment acc |", "|---|---|---|---|---|"]
    for label, _ in tables["testnew"]:
        if not (label.startswith(METHOD_NAMES[DEMO_METHOD] + " ") or label == METHOD_NAMES[DEMO_METHOD] or label.startswith("Zero")):
            continue
        row = {view: dict(tables[view])[label][DEMO_SPLIT] for view in VIEWS}
        L.append(f"| {label} | {100 * row['base_test']['ece']:.1f} | {100 * row['testnew']['ece']:.1f} | "
                 f"{100 * row['deployed']['ece']:.1f} | {100 * row['deployed']['acc']:.1f} |")
    L += ["", "\"CAC chosen\" in this table is the study's best reading; the bundle carries the best reading the runtime "
              "implements (the same when it has no sign or TS term).", "",
          "## Files", "",
          "- `images/{base,val-new,test-new}/<class>/NN.jpg` and `images/labels.csv` (`path,label,split`): 4 test images "
          "per class, byte-identical to the study's first four test images; `images/validation/` + `validation.csv`: "
          "base-class validation images for `cac-edge eval --fit-images`; `images/clear.csv`: images the bundle gets right "
          "with a wide margin under onnxruntime on open_clip's preprocessing (`select_clear_examples.py`, used by tests).",
          "- `image_zs.int8.onnx`: the int8-dynamic image encoder made by `onnx/quantize.py`.", "",
          "## `cac-edge eval` on the sample images", "",
          "`eval-report/` is the runtime's own calibration report on the sample images. Regenerate it with:", "",
          "```sh",
          "cac-edge eval --device cpu --bundle onnx/demo --cache calibration-cache/miniworld-demo.safetensors \\",
          "    --images onnx/demo/images/labels.csv --fit-images onnx/demo/images/validation.csv --fit-cac \\",
          "    --target-precision 0.9 --out onnx/demo/eval-report",
          "```", ""]
    with open(os.path.join(DEMO, "REPORT.md"), "w") as f:
        f.write("\n".join(L) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command")
    run = sub.add_parser("run", help="one world: pretrain, choose knobs, train, export, evaluate")
    run.add_argument("--world", choices=list(WORLDS), required=True)
    rep_check = sub.add_parser("check-reproducible", help="split 0 of a finished world again: identical logits?")
    rep_check.add_argument("--world", choices=list(WORLDS), required=True)
    rep = sub.add_parser("report", help="the choice, tables, significance, cross-check and onnx/EVIDENCE.md")
    rep.add_argument("--no-crosscheck", action="store_true")
    rep.add_argument("--demo", action="store_true", help="also rebuild onnx/demo from the chosen world")
    args = ap.parse_args(argv)
    if args.command == "run":
        run_world(args.world)
    elif args.command == "check-reproducible":
        sys.exit(0 if check_reproducible(args.world) else 1)
    elif args.command == "report":
        report(not args.no_crosscheck, args.demo)
    else:  # everything: the three worlds at once (one torch thread each), then the report
        os.makedirs(WORK, exist_ok=True)
        pending = list(WORLDS)
        running = []
        while pending or running:
            while pending and len(running) < len(WORLDS):
                name = pending.pop(0)
                log = open(os.path.join(WORK, f"{name}.log"), "w")
                running.append((name, subprocess.Popen([sys.executable, __file__, "run", "--world", name], stdout=log,
                                                       stderr=subprocess.STDOUT)))
            time.sleep(5)
            for name, proc in list(running):
                if proc.poll() is not None:
                    running.remove((name, proc))
                    if proc.returncode != 0:
                        sys.exit(f"world {name} failed (exit {proc.returncode}); see {WORK}/{name}.log")
        report()


if __name__ == "__main__":
    main()
