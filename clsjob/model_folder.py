"""The model folder's contract: what `clsjob merge` writes into a classifier folder's
config.json beside transformers' own keys, and how the back ends read it back. The evaluation
modules compute these values (calibration.py the temperature, abstain.py the threshold,
multilabel.py the per-label thresholds); this module alone names the keys and checks them, so
a back end reads a folder without importing evaluation code.

config.json (transformers' PretrainedConfig keeps unknown keys through save_pretrained):
- `problem_type`: transformers' own key: the task's (task.py; a multi-label head is a sigmoid
  per label, and transformers and vLLM both read it).
- `clsjob_temperature`: T fitted on the fine-tune's eval rows; probs = softmax(logits / T)
  (scaled_softmax; rescale_probs where a back end has only softmax(logits)). Absent: 1.
- `clsjob_abstain_below`: the confidence threshold the fine-tune picked; classify's
  `abstain.below` when the config leaves it out.
- `clsjob_thresholds`: {label: threshold} of a multi-label model, tuned on the eval rows;
  0.5 for a label it has none for.
- `clsjob_distance`: {"k", "above", "rows"} of a model fine-tuned with
  `training.distance_index_rows`: `abstain.score: distance` is the cosine distance to the
  k-th nearest of the `rows` training rows in `clsjob_distance_index.npy` (beside
  config.json; float16, unit length), and `above` (or null) the threshold picked on the eval
  rows; `mahalanobis_above` the same for `abstain.distance: mahalanobis`, whose class means
  and shared precision matrix are `clsjob_distance_gaussians.npz` (float32).
"""
from __future__ import annotations

import math

import numpy as np

from clsjob.labels import LabelSet

TEMPERATURE_KEY = "clsjob_temperature"
ABSTAIN_KEY = "clsjob_abstain_below"
THRESHOLDS_KEY = "clsjob_thresholds"
DISTANCE_KEY = "clsjob_distance"
DISTANCE_INDEX = "clsjob_distance_index.npy"
DISTANCE_GAUSSIANS = "clsjob_distance_gaussians.npz"
# abstain.distance -> (the file its score needs, its threshold's key in clsjob_distance).
DISTANCE_KINDS = {"knn": (DISTANCE_INDEX, "above"),
                  "mahalanobis": (DISTANCE_GAUSSIANS, "mahalanobis_above")}


def written_keys(task, summary: dict) -> dict:
    """The keys `merge` sets on the merged model's config, from the fine-tune's summary
    (clsjob_finetune.json): its `task`'s problem_type (task.py), and what it fitted on its
    eval rows, if it had any (a multi-label head's thresholds, a temperature)."""
    keys = {}
    if task.problem_type:
        keys["problem_type"] = task.problem_type
    if summary.get("thresholds"):
        keys[THRESHOLDS_KEY] = summary["thresholds"]
    calibration = summary.get("calibration")
    if calibration:
        keys[TEMPERATURE_KEY] = calibration["temperature"]
        if calibration.get("abstain"):
            keys[ABSTAIN_KEY] = calibration["abstain"]["below"]
    if summary.get("distance"):
        keys[DISTANCE_KEY] = {key: summary["distance"][key] for key in ("k", "above", "rows")
                              if key in summary["distance"]}
        if "mahalanobis_above" in summary["distance"]:
            keys[DISTANCE_KEY]["mahalanobis_above"] = summary["distance"]["mahalanobis_above"]
    return keys


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


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def temperature(config: dict, where: str) -> float:
    """The folder's temperature (1.0: none fitted); `where` names the folder in the error a
    bad value raises."""
    value = config.get(TEMPERATURE_KEY, 1.0)
    if not is_number(value) or not 0 < value < math.inf:
        raise ValueError(f"{where}: config.json's {TEMPERATURE_KEY} must be a positive number, "
                         f"not {value!r}")
    return float(value)


def thresholds(config: dict, labels: LabelSet, where: str) -> np.ndarray:
    """Each label's threshold (in `labels`' order); 0.5 for a label the folder has none for.
    `where` names the folder in the error a bad value raises."""
    given = config.get(THRESHOLDS_KEY) or {}
    bad = {k: v for k, v in given.items() if not is_number(v) or not 0 < v < 1}
    if not isinstance(given, dict) or bad:
        raise ValueError(f"{where}: config.json's {THRESHOLDS_KEY} must map labels to numbers "
                         f"between 0 and 1, not {bad or given!r}")
    return np.array([float(given.get(name, 0.5)) for name in labels.names])


def abstain_below(config: dict) -> float | None:
    """The folder's abstention threshold, or None where it has none usable (0 < below <= 1);
    the caller says what that means for its run."""
    below = config.get(ABSTAIN_KEY)
    return float(below) if is_number(below) and 0 < below <= 1 else None


def distance_settings(config: dict, where: str, kind: str = "knn") -> tuple[int, float | None]:
    """(k, the threshold of `kind` or None) of a folder that carries a distance index;
    `where` names the folder in the error a missing or bad entry raises."""
    entry = config.get(DISTANCE_KEY)
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: config.json has no {DISTANCE_KEY} (found {entry!r}): "
                         f"fine-tune with training.distance_index_rows and merge")
    key = DISTANCE_KINDS[kind][1]
    k, above = entry.get("k"), entry.get(key)
    top = 2 if kind == "knn" else math.inf
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or \
            (above is not None and not (is_number(above) and 0 <= above <= top)):
        raise ValueError(f"{where}: config.json's {DISTANCE_KEY} needs a positive integer k "
                         f"and a {key} between 0 and {top} (or null), not {entry!r}")
    if key not in entry:
        raise ValueError(f"{where}: config.json's {DISTANCE_KEY} has no {key}: the folder was "
                         f"fine-tuned before abstain.distance {kind} existed; fine-tune again")
    return k, (float(above) if above is not None else None)
