"""Temperature scaling: one number T, fitted on labelled rows, that turns a classifier's
over-confident softmax(logits) into softmax(logits / T), whose confidence matches its accuracy.

Pure numpy. T is fitted where the eval rows are (fine-tuning, or `clsjob calibrate` on a
labelled run), kept in the model folder's config.json (model_folder.py, written by
`merge`), and applied by the back ends that report probabilities. Dividing every logit by the
same T never changes which label is highest: accuracy stays exactly as it was.
"""
from __future__ import annotations

import math

import numpy as np

from clsjob.model_folder import log_softmax, scaled_softmax

# Reliability bins of ECE and of the run's calibration table (metrics.py counts rows in them).
CALIBRATION_BINS = 15
# The search runs over beta = 1 / T, in which the NLL is convex (the log-sum-exp of a linear
# function of beta, minus a linear term), so a bracketing search finds the one minimum.
# T from 0.05 to 100: on eval rows the model gets all right the NLL falls forever as T -> 0,
# and on labels its answers say nothing of it rises forever; a fit that ends at a bound is
# flagged (`at_bound`) instead of running off to a temperature of 0 or infinity.
BETA_RANGE = (0.01, 20.0)


def calibration_bin(confidence: np.ndarray) -> np.ndarray:
    """Equal-width bins over [0, 1], right-closed so a confidence of exactly 1.0 is counted."""
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, CALIBRATION_BINS - 1)


def nll(probs: np.ndarray, gold: np.ndarray) -> float:
    """Mean negative log-likelihood of the gold labels (probabilities floored at 1e-12)."""
    picked = np.asarray(probs, dtype=np.float64)[np.arange(len(gold)), gold]
    return float(-np.log(np.maximum(picked, 1e-12)).mean())


def ece(probs: np.ndarray, gold: np.ndarray) -> float:
    """Expected calibration error over CALIBRATION_BINS equal-width bins of the top
    probability: the rows-weighted mean of |accuracy - mean confidence| per bin (the same
    bins as the run metrics in metrics.py)."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence, correct = probs.max(axis=1), (probs.argmax(axis=1) == gold).astype(np.float64)
    bins = calibration_bin(confidence)
    rows = np.bincount(bins, minlength=CALIBRATION_BINS)
    gap = np.bincount(bins, correct - confidence, minlength=CALIBRATION_BINS)
    return float(np.abs(gap).sum() / max(rows.sum(), 1))


def fit_temperature(logits: np.ndarray, gold: np.ndarray, tolerance: float = 1e-6) -> float:
    """The T minimising the NLL of softmax(logits / T) on these rows: golden-section search
    over beta = 1/T in BETA_RANGE (convex there, so the bracket closes on the minimum)."""
    logits, gold = np.asarray(logits, dtype=np.float64), np.asarray(gold, dtype=np.int64)
    if not len(gold):
        raise ValueError("fitting a temperature needs at least one labelled row")

    def loss(beta: float) -> float:
        return -log_softmax(logits * beta)[np.arange(len(gold)), gold].mean()

    ratio = (math.sqrt(5) - 1) / 2
    lo, hi = math.log(BETA_RANGE[0]), math.log(BETA_RANGE[1])
    # Search log(beta): the range spans five decades, which a linear bracket would take far
    # more steps to narrow near the small end. Convexity in beta keeps one minimum in log(beta).
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(math.exp(a)), loss(math.exp(b))
    while hi - lo > tolerance:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(math.exp(b))
    return float(1.0 / math.exp((lo + hi) / 2))


def calibrate(logits: np.ndarray, gold: np.ndarray) -> dict:
    """Fit T on labelled rows and say what it did: ECE and NLL before and after, and the
    accuracy (unchanged by construction). What clsjob_finetune.json and `clsjob calibrate`
    record."""
    logits, gold = np.asarray(logits, dtype=np.float64), np.asarray(gold, dtype=np.int64)
    temperature = fit_temperature(logits, gold)
    before, after = scaled_softmax(logits, 1.0), scaled_softmax(logits, temperature)
    bounds = (1 / BETA_RANGE[1], 1 / BETA_RANGE[0])
    return {"temperature": round(temperature, 6), "rows": int(len(gold)),
            "at_bound": bool(min(abs(math.log(temperature / b)) for b in bounds) < 1e-3),
            "accuracy": float((logits.argmax(axis=1) == gold).mean()),
            "ece_before": round(ece(before, gold), 6), "ece_after": round(ece(after, gold), 6),
            "nll_before": round(nll(before, gold), 6), "nll_after": round(nll(after, gold), 6)}
