"""Temperature scaling: one number T, fitted on labelled rows, that turns a classifier's
over-confident softmax(logits) into softmax(logits / T), whose confidence matches its accuracy.

Pure numpy. T is fitted where the eval rows are (fine-tuning, or `clsjob calibrate` on a
labelled run), kept in the model folder's config.json under TEMPERATURE_KEY (written by
`merge`), and applied by the back ends that report probabilities. Dividing every logit by the
same T never changes which label is highest: accuracy stays exactly as it was.
"""
from __future__ import annotations

import math

import numpy as np

from clsjob.metrics import CALIBRATION_BINS, calibration_bin

# config.json's key for the fitted temperature; HF's PretrainedConfig keeps unknown keys, so
# it survives save_pretrained and is read back as an attribute.
TEMPERATURE_KEY = "clsjob_temperature"
# The search runs over beta = 1 / T, in which the NLL is convex (the log-sum-exp of a linear
# function of beta, minus a linear term), so a bracketing search finds the one minimum.
# T from 0.05 to 100: on eval rows the model gets all right the NLL falls forever as T -> 0,
# and on labels its answers say nothing of it rises forever; a fit that ends at a bound is
# flagged (`at_bound`) instead of running off to a temperature of 0 or infinity.
BETA_RANGE = (0.01, 20.0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def scaled_softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature))


def rescale_probs(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from softmax(logits) alone (what vLLM's classify returns): log p
    is the logits up to a per-row constant, which the softmax removes. A probability that
    underflowed to 0 stays 0 (float32 does so only e^-103 below the top label)."""
    if temperature == 1.0:
        return probs
    with np.errstate(divide="ignore"):
        logp = np.log(np.asarray(probs, dtype=np.float64))
    return scaled_softmax(logp, temperature).astype(np.float32)


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


def model_temperature(config: dict, where: str) -> float:
    """The temperature a model folder's config.json carries (1.0: none fitted); `where`
    names the folder in the error a bad value raises."""
    value = config.get(TEMPERATURE_KEY, 1.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ValueError(f"{where}: config.json's {TEMPERATURE_KEY} must be a positive number, "
                         f"not {value!r}")
    return float(value)
