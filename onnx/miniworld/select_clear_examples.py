"""Picks "clearly drawn" demo images for the runtime's regression test (tests/demo.rs): images
whose label the committed demo bundle predicts correctly and with a wide margin, judged
independently of cac-edge, with onnxruntime on open_clip's own preprocessing. Writes
onnx/demo/images/clear.csv (path,label; paths relative to onnx/demo/images/). Run after build_demo.py:
    onnx/.venv/bin/python onnx/miniworld/select_clear_examples.py
"""
import csv
import pathlib
import tomllib

import numpy as np
import onnxruntime as ort
import open_clip
from PIL import Image

DEMO = pathlib.Path(__file__).resolve().parents[1] / "demo"
PER_SPLIT = 4          # images kept per split (base, val-new, test-new)
MIN_MARGIN = 0.5       # top-1 minus top-2 uncalibrated probability


def normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main():
    manifest = tomllib.loads((DEMO / "bundle.toml").read_text())
    session = lambda name: ort.InferenceSession(str(DEMO / name), providers=["CPUExecutionProvider"])
    classes = [line.strip() for line in (DEMO / "classes.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    context = manifest["text"]["context_length"]
    ft = manifest["fine_tuned"]
    ids = open_clip.tokenize([ft["template"].replace("{}", c) for c in classes], context_length=context).numpy()
    text = normalise(session(ft["text_encoder"]).run(None, {"input_ids": ids.astype(np.int64)})[0])
    transform = open_clip.image_transform(manifest["preprocess"]["image_size"], is_train=False)
    image_session = session(manifest["zero_shot"]["image_encoder"])
    rows = list(csv.DictReader(open(DEMO / "images" / "labels.csv")))
    chosen, per_split = [], {}
    for row in rows:
        if per_split.get(row["split"], 0) >= PER_SPLIT:
            continue
        pixels = transform(Image.open(DEMO / "images" / row["path"])).numpy()[None]
        image = normalise(image_session.run(None, {"pixel_values": pixels})[0])
        logits = ft["logit_scale"] * image @ text.T
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        order = np.argsort(-probs[0])
        if classes[order[0]] == row["label"] and probs[0, order[0]] - probs[0, order[1]] >= MIN_MARGIN:
            chosen.append((row["path"], row["label"]))
            per_split[row["split"]] = per_split.get(row["split"], 0) + 1
    with open(DEMO / "images" / "clear.csv", "w") as f:
        f.write("path,label\n" + "".join(f"{p},{l}\n" for p, l in chosen))
    print(f"wrote {len(chosen)} clear examples: {per_split}")


if __name__ == "__main__":
    main()
