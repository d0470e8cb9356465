"""The calibration methods of docs/CALIBRATION.md (src/calibrate.rs) and the metrics, in numpy.

Every method multiplies the fine-tuned logits of an image by w > 0: p = softmax(w * l_ft), in
float64. ECE: top-label, 15 equal-width bins, right-closed (lo, hi], confidence 0 in the first
bin and 1.0 in the last (the uncertainty-calibration / scikit-learn convention).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

DAC_NEIGHBOURS = 5
DAC_BASE_DISTANCE = 0.05


def softmax(logits: np.ndarray, w) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) * np.asarray(w, dtype=np.float64).reshape(-1, 1)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def argmax(logits: np.ndarray) -> np.ndarray:
    return np.argmax(logits, axis=1)  # first index on ties, as the runtime


def logit_contrast(l_ft, l_zs):
    return np.abs(np.asarray(l_ft, np.float64) - np.asarray(l_zs, np.float64)).mean(axis=1)


def probability_contrast(l_ft, l_zs):
    return np.abs(softmax(l_ft, 1.0) - softmax(l_zs, 1.0)).sum(axis=1)


def cac_weight(contrast, alpha, k, thresholds=None, sign=-1):
    """α·exp(−d/k), the runtime's map. `sign=+1` is a candidate reading studied in
    onnx/EVIDENCE.md (trust the fine-tuned model *more* the further it moved), not in the runtime."""
    d = np.asarray(contrast, np.float64)
    if thresholds is not None:
        lo, hi = thresholds
        d = np.where(d < lo, 0.0, np.where(d > hi, hi, d))
    return alpha * np.exp(np.clip(sign * d / k, -745.0, 700.0))


def weights(method: dict, l_ft, l_zs, dac_factors) -> np.ndarray:
    n = len(l_ft)
    kind = method["method"]
    if kind == "none":
        return np.ones(n)
    if kind == "ts":
        return np.full(n, 1.0 / method["temperature"])
    if kind == "dac":
        return np.asarray(dac_factors, np.float64)[argmax(l_ft)]
    if kind == "cac":
        contrast = logit_contrast(l_ft, l_zs) if method["distance"] == "logits" else probability_contrast(l_ft, l_zs)
        w = cac_weight(contrast, method["alpha"], method["k"], method.get("thresholds"), method.get("sign", -1))
        # "stacked on TS" (a candidate reading, onnx/EVIDENCE.md): the CAC weight times 1/T
        return w / method["temperature"] if method.get("over_ts") else w
    raise ValueError(kind)


def dac_factors(zs_features: np.ndarray, ft_features: np.ndarray, is_base: np.ndarray) -> np.ndarray:
    """r(c) = exp(D0(c) - Dft(c)); 1 where the nearest fine-tuned base distance < 0.05."""
    base = np.flatnonzero(is_base)
    out = np.empty(len(is_base))
    for c in range(len(is_base)):
        d0 = np.sort(np.linalg.norm(zs_features[base].astype(np.float64) - zs_features[c], axis=1))
        dft = np.sort(np.linalg.norm(ft_features[base].astype(np.float64) - ft_features[c], axis=1))
        if dft[0] < DAC_BASE_DISTANCE:
            out[c] = 1.0
            continue
        out[c] = np.exp(d0[:DAC_NEIGHBOURS].mean() - dft[:DAC_NEIGHBOURS].mean())
    return out


def bin_index(conf: np.ndarray, bins: int = 15) -> np.ndarray:
    interior = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    return np.searchsorted(interior, conf, side="left")  # (lo, hi]; 0 -> bin 0, 1 -> last bin


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    idx = bin_index(conf, bins)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(correct[m].mean() - conf[m].mean())
    return total / len(labels)


def reliability(probs, labels, bins: int = 15):
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    idx = bin_index(conf, bins)
    rows = []
    for b in range(bins):
        m = idx == b
        rows.append((b, int(m.sum()), float(correct[m].mean()) if m.any() else np.nan,
                     float(conf[m].mean()) if m.any() else np.nan))
    return rows


def nll(probs, labels):
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None)).mean())


def fit_temperature(l_ft: np.ndarray, labels: np.ndarray) -> float:
    """T minimising the NLL of softmax(l_ft / T) (search over log T in [log 0.05, log 50])."""
    res = minimize_scalar(lambda lt: nll(softmax(l_ft, np.exp(-lt)), labels), bounds=(np.log(0.05), np.log(50.0)),
                          method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def ace(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE over equal-mass bins, as uncertainty-calibration's `get_ece_em` and the
    runtime's `adaptive_calibration_error`: the sorted confidences cut like `np.array_split`,
    inner edges at midpoints, duplicate edges merged, bins (lo, hi]."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    s = np.sort(conf)
    parts = min(bins, len(s))
    size, larger = divmod(len(s), parts)
    starts = [p * size + min(p, larger) for p in range(1, parts)]
    uppers = np.unique(np.r_[[(s[i - 1] + s[i]) / 2.0 for i in starts], 1.0])
    idx = np.searchsorted(uppers, conf, side="left")
    total = 0.0
    for b in range(len(uppers)):
        m = idx == b
        if m.any():
            total += m.sum() * abs(correct[m].mean() - conf[m].mean())
    return total / len(labels)


def nll_clipped(probs, labels):
    """Mean NLL as scikit-learn's `log_loss` (probability of the true class clipped to [eps, 1 - eps])."""
    eps = np.finfo(np.float64).eps
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1 - eps)).mean())
