"""Classification metrics in pure numpy (checked against scikit-learn in the unit tests).

Metrics are computed from a `Tally` of counts that adds up across output parts, so a run over
billions of rows evaluates part by part without ever holding the predictions in one place.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from clsjob.calibration import CALIBRATION_BINS, calibration_bin
from clsjob.labels import LabelSet
from clsjob.model_folder import rescale_probs
from clsjob.multilabel import MultiLabelTally, count_multilabel, summarize_multilabel

# Accuracy against coverage: scored rows counted by confidence in bins 0.001 wide, so that
# the rows at or above any threshold k/1000 are exactly the bins from k on.
COVERAGE_BINS = 1000
COVERAGE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


@dataclass
class Tally:
    """Additive counts behind every metric."""

    n_labels: int
    rows: int = 0
    errored: int = 0
    gold_missing: int = 0
    gold_unknown: Counter = field(default_factory=Counter)
    no_confidence: int = 0
    confusion: np.ndarray = None  # gold x predicted
    bin_rows: np.ndarray = None  # calibration: rows, summed confidence, correct rows per bin
    bin_confidence: np.ndarray = None
    bin_correct: np.ndarray = None
    coverage_rows: np.ndarray = None  # scored rows with a confidence, per COVERAGE_BINS bin
    coverage_correct: np.ndarray = None
    nll_sum: float = 0.0  # -log P(gold) summed over the scored rows that have probabilities
    nll_rows: int = 0
    # Every labelled row, gold or not (monitor.py: the run's distribution, drift): rows per
    # predicted label, and rows with a confidence per COVERAGE_BINS bin, with their sum.
    label_counts: np.ndarray = None
    confidence_counts: np.ndarray = None
    confidence_sum: float = 0.0
    # The same calibration bins and NLL for the probabilities before the run's temperature
    # (softmax(logits) where the run reported softmax(logits / T)): before and after.
    raw_bin_rows: np.ndarray = None
    raw_bin_confidence: np.ndarray = None
    raw_bin_correct: np.ndarray = None
    raw_nll_sum: float = 0.0
    raw_nll_rows: int = 0
    # task: multi_label: the per-label counts of the scored rows (multilabel.py); the
    # single-label counts above (confusion, calibration, coverage) then stay empty, and
    # label_counts counts every label given (a row may add several, or none).
    multilabel: MultiLabelTally | None = None

    def __post_init__(self) -> None:
        k = self.n_labels
        if self.confusion is None:
            self.confusion = np.zeros((k, k), dtype=np.int64)
        for name in ("bin_rows", "bin_confidence", "bin_correct", "raw_bin_rows",
                     "raw_bin_confidence", "raw_bin_correct"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(CALIBRATION_BINS, dtype=np.float64))
        for name in ("coverage_rows", "coverage_correct", "confidence_counts"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(COVERAGE_BINS, dtype=np.int64))
        if self.label_counts is None:
            self.label_counts = np.zeros(k, dtype=np.int64)

    @classmethod
    def for_task(cls, n_labels: int, task: str) -> "Tally":
        """No rows counted yet, for a run of `task` (a multi_label run with no scored row still
        reports multi-label metrics, all None)."""
        return cls(n_labels, multilabel=MultiLabelTally(n_labels) if task == "multi_label" else None)

    def add(self, other: "Tally") -> "Tally":
        self.rows += other.rows
        self.errored += other.errored
        self.gold_missing += other.gold_missing
        self.gold_unknown.update(other.gold_unknown)
        self.no_confidence += other.no_confidence
        self.confusion += other.confusion
        self.bin_rows += other.bin_rows
        self.bin_confidence += other.bin_confidence
        self.bin_correct += other.bin_correct
        self.coverage_rows += other.coverage_rows
        self.coverage_correct += other.coverage_correct
        self.nll_sum += other.nll_sum
        self.nll_rows += other.nll_rows
        self.label_counts += other.label_counts
        self.confidence_counts += other.confidence_counts
        self.confidence_sum += other.confidence_sum
        for name in ("raw_bin_rows", "raw_bin_confidence", "raw_bin_correct"):
            getattr(self, name).__iadd__(getattr(other, name))
        self.raw_nll_sum += other.raw_nll_sum
        self.raw_nll_rows += other.raw_nll_rows
        if other.multilabel is not None:
            if self.multilabel is None:
                self.multilabel = MultiLabelTally(self.n_labels)
            self.multilabel.add(other.multilabel)
        return self

    def to_json(self) -> dict:
        return {
            "n_labels": self.n_labels, "rows": self.rows, "errored": self.errored,
            "gold_missing": self.gold_missing, "gold_unknown": dict(self.gold_unknown),
            "no_confidence": self.no_confidence, "confusion": self.confusion.tolist(),
            "bin_rows": self.bin_rows.tolist(), "bin_confidence": self.bin_confidence.tolist(),
            "bin_correct": self.bin_correct.tolist(),
            # Sparse: a part's confidences fill few of the 1,000 bins.
            "coverage": sparse(self.coverage_rows, self.coverage_correct),
            "nll_sum": self.nll_sum, "nll_rows": self.nll_rows,
            "label_counts": self.label_counts.tolist(),
            "confidence_counts": [[int(i), int(self.confidence_counts[i])]
                                  for i in np.flatnonzero(self.confidence_counts)],
            "confidence_sum": self.confidence_sum,
            **({"raw_bin_rows": self.raw_bin_rows.tolist(),
                "raw_bin_confidence": self.raw_bin_confidence.tolist(),
                "raw_bin_correct": self.raw_bin_correct.tolist(),
                "raw_nll_sum": self.raw_nll_sum, "raw_nll_rows": self.raw_nll_rows}
               if self.raw_bin_rows.any() else {}),  # only where a temperature was applied
            **({"multilabel": self.multilabel.to_json()} if self.multilabel is not None else {}),
        }

    @classmethod
    def from_json(cls, data: dict) -> "Tally":
        return cls(
            n_labels=data["n_labels"], rows=data["rows"], errored=data["errored"],
            gold_missing=data["gold_missing"], gold_unknown=Counter(data["gold_unknown"]),
            no_confidence=data["no_confidence"],
            confusion=np.array(data["confusion"], dtype=np.int64).reshape(
                data["n_labels"], data["n_labels"]),
            bin_rows=np.array(data["bin_rows"]), bin_confidence=np.array(data["bin_confidence"]),
            bin_correct=np.array(data["bin_correct"]),
            # Markers written before coverage was counted have none: zeros, as for no rows.
            # Markers written before NLL was counted have none, as for no probabilities.
            nll_sum=data.get("nll_sum", 0.0), nll_rows=data.get("nll_rows", 0),
            label_counts=(np.array(data["label_counts"], dtype=np.int64)
                          if "label_counts" in data else None),
            confidence_counts=binned(data.get("confidence_counts", [])),
            confidence_sum=data.get("confidence_sum", 0.0),
            **{name: np.array(data[name]) for name in ("raw_bin_rows", "raw_bin_confidence",
                                                       "raw_bin_correct") if name in data},
            raw_nll_sum=data.get("raw_nll_sum", 0.0), raw_nll_rows=data.get("raw_nll_rows", 0),
            multilabel=(MultiLabelTally.from_json(data["multilabel"]) if "multilabel" in data
                        else None),
            **dense(data.get("coverage", [])))


def sparse(rows: np.ndarray, correct: np.ndarray) -> list[list[int]]:
    """[bin, rows, correct] for each bin that holds rows."""
    return [[int(i), int(rows[i]), int(correct[i])] for i in np.flatnonzero(rows)]


def binned(entries: list[list[int]]) -> np.ndarray:
    """[bin, rows] pairs back into COVERAGE_BINS counts."""
    counts = np.zeros(COVERAGE_BINS, np.int64)
    for i, n in entries:
        counts[i] = n
    return counts


def dense(entries: list[list[int]]) -> dict[str, np.ndarray]:
    rows, correct = np.zeros(COVERAGE_BINS, np.int64), np.zeros(COVERAGE_BINS, np.int64)
    for i, n, c in entries:
        rows[i], correct[i] = n, c
    return {"coverage_rows": rows, "coverage_correct": correct}


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are gold classes, columns are predicted classes."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def count_rows(labels: LabelSet, gold: Sequence[str | None], predicted: Sequence[str | None],
               confidence: Sequence[float | None], errors: Sequence[str | None],
               probs: Sequence[Sequence[float] | None] | None = None,
               temperature: float | None = None) -> Tally:
    """Count one batch of output rows. Rows that errored, have no gold label, or whose gold
    label is outside the label set are counted and left out of the scores, never a crash.
    `probs` (in label order) adds the negative log-likelihood of the gold labels, and with
    the `temperature` they were scaled by (not 1) the same counts before it."""
    t = Tally(n_labels=len(labels), rows=len(gold))
    y_true, y_pred, conf = [], [], []
    every_conf, raw = [], []  # raw: (scored row, its probabilities) to unscale
    for i, (g, p, c, e) in enumerate(zip(gold, predicted, confidence, errors)):
        if e is None and p in labels:  # the run's distribution: every labelled row
            t.label_counts[labels.id_of(p)] += 1
            if c is not None:
                every_conf.append(c)
        if e is not None:
            t.errored += 1
        elif g is None:
            t.gold_missing += 1
        elif g not in labels:
            t.gold_unknown[g] += 1
        else:
            y_true.append(labels.id_of(g))
            y_pred.append(labels.id_of(p))
            conf.append(c)
            # A gold fallback label (abstention) has no probability of its own: no NLL term.
            if probs is not None and probs[i] is not None and y_true[-1] < len(probs[i]):
                t.nll_sum -= math.log(max(probs[i][y_true[-1]], 1e-12))  # as calibration.nll
                t.nll_rows += 1
            if probs is not None and probs[i] is not None and temperature not in (None, 1.0):
                raw.append((len(y_true) - 1, probs[i]))
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    t.confusion += confusion_matrix(y_true, y_pred, len(labels))
    has_conf = np.array([c is not None for c in conf], dtype=bool)
    t.no_confidence = int((~has_conf).sum())
    scored_conf = np.array([c for c in conf if c is not None], dtype=np.float64)
    bins = calibration_bin(scored_conf)
    correct = (y_true == y_pred)[has_conf].astype(np.float64)
    np.add.at(t.bin_rows, bins, 1.0)
    np.add.at(t.bin_confidence, bins, scored_conf)
    np.add.at(t.bin_correct, bins, correct)
    count_confidences(t, every_conf)
    fine = coverage_bin(scored_conf)
    np.add.at(t.coverage_rows, fine, 1)
    np.add.at(t.coverage_correct, fine, correct.astype(np.int64))
    if raw:
        count_unscaled(t, raw, y_true, y_pred, temperature)
    return t


def count_multilabel_rows(labels: LabelSet, gold: Sequence[Sequence[str] | None],
                          predicted: Sequence[Sequence[str] | None],
                          confidence: Sequence[float | None], errors: Sequence[str | None]) -> Tally:
    """count_rows for task: multi_label, where a row's gold and predicted labels are lists.
    Rows that errored, have no gold list, or name a gold label outside the set are counted
    and left out of the scores (an empty gold list is a row no label applies to: scored)."""
    t = Tally(n_labels=len(labels), rows=len(gold))
    scored_gold, scored_pred, every_conf = [], [], []
    for g, p, c, e in zip(gold, predicted, confidence, errors):
        if e is not None:
            t.errored += 1
            continue
        for name in p or ():
            t.label_counts[labels.id_of(name)] += 1
        if c is not None:
            every_conf.append(c)
        unknown = [x for x in g or () if x not in labels]
        if g is None:
            t.gold_missing += 1
        elif unknown:
            t.gold_unknown[unknown[0]] += 1
        else:
            scored_gold.append([labels.id_of(x) for x in g])
            scored_pred.append([labels.id_of(x) for x in p or ()])
    t.multilabel = count_multilabel(len(labels), scored_gold, scored_pred)
    count_confidences(t, every_conf)
    return t


def count_part(labels: LabelSet, part, gold_column: str | None,
               temperature: float | None = None) -> Tally:
    """The counts of one written part (a pyarrow Table in the output contract):
    count_multilabel_rows where it has a `labels` column (task: multi_label), else
    count_rows. Without a gold column every row counts as having no gold label."""
    def column(name):
        return part.column(name).to_pylist()
    gold = (column(gold_column) if gold_column and gold_column in part.column_names
            else [None] * part.num_rows)
    if "labels" in part.column_names:
        return count_multilabel_rows(labels, gold, column("labels"), column("confidence"),
                                     column("error"))
    return count_rows(labels, gold, column("label"), column("confidence"), column("error"),
                      column("probs"), temperature)


def count_confidences(t: Tally, confidences: list[float]) -> None:
    """The run's confidence histogram and sum: every labelled row's, gold label or not
    (what drift between runs compares)."""
    every = np.array(confidences, dtype=np.float64)
    np.add.at(t.confidence_counts, coverage_bin(every), 1)
    t.confidence_sum = float(every.sum())


def count_unscaled(t: Tally, raw: list[tuple[int, Sequence[float]]], y_true: np.ndarray,
                   y_pred: np.ndarray, temperature: float) -> None:
    """Calibration bins and NLL of softmax(logits) for scored rows reported as
    softmax(logits / T). The label is the same either way (a temperature never changes the
    top label), so a row is right or wrong alike before and after."""

    rows = np.array([r for r, _ in raw])
    unscaled = rescale_probs(np.array([p for _, p in raw], dtype=np.float64), 1 / temperature)
    confidence = unscaled.max(axis=1)
    bins = calibration_bin(confidence)
    np.add.at(t.raw_bin_rows, bins, 1.0)
    np.add.at(t.raw_bin_confidence, bins, confidence)
    np.add.at(t.raw_bin_correct, bins, (y_true[rows] == y_pred[rows]).astype(np.float64))
    gold = y_true[rows]
    inside = gold < unscaled.shape[1]  # a gold fallback label has no probability
    t.raw_nll_sum -= float(np.log(np.maximum(unscaled[inside, gold[inside]], 1e-12)).sum())
    t.raw_nll_rows += int(inside.sum())


def coverage_bin(confidence: np.ndarray) -> np.ndarray:
    """Bin k holds confidences in [k/1000, (k+1)/1000); 1.0 goes into the last."""
    return np.clip(np.floor(confidence * COVERAGE_BINS).astype(np.int64), 0, COVERAGE_BINS - 1)


def coverage_table(t: Tally, target_accuracy: float | None) -> dict | None:
    """For each threshold, the share of scored rows whose confidence is at or above it and
    their accuracy; and the lowest threshold (in steps of 0.001) whose rows reach
    `target_accuracy`, with its coverage. None without confidences (generating modes)."""
    total = int(t.coverage_rows.sum())
    if not total or t.no_confidence:
        return None
    # Rows and correct rows at or above bin k, for every k.
    rows_from = np.cumsum(t.coverage_rows[::-1])[::-1]
    correct_from = np.cumsum(t.coverage_correct[::-1])[::-1]

    def at(k: int) -> dict:
        n = int(rows_from[k]) if k < COVERAGE_BINS else 0
        return {"coverage": n / total, "rows": n,
                "accuracy": float(correct_from[k] / n) if n else None}

    table = {"rows_scored": total,
             "thresholds": [{"threshold": th, **at(round(th * COVERAGE_BINS))}
                            for th in COVERAGE_THRESHOLDS]}
    if target_accuracy is not None:
        reach = np.flatnonzero((rows_from > 0) & (correct_from >= target_accuracy * rows_from))
        table["target_accuracy"] = target_accuracy
        table["target"] = ({"threshold": reach[0] / COVERAGE_BINS, **at(int(reach[0]))}
                           if reach.size else None)
    return table


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class; 0 where a ratio is undefined (sklearn's
    zero_division=0), so a class never predicted does not turn the averages into NaN."""
    tp = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    support = matrix.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support,
            "predicted": predicted}


def averaged(scores: dict[str, np.ndarray]) -> dict[str, float]:
    support = scores["support"]
    # Macro averages over the classes that occur in gold or predictions (sklearn's default):
    # a class absent from both carries no information and would only drag the mean to 0.
    present = (support + scores["predicted"]) > 0
    weights = support / support.sum() if support.sum() else np.zeros_like(support)
    out = {}
    for name in ("precision", "recall", "f1"):
        out[f"{name}_macro"] = float(scores[name][present].mean()) if present.any() else 0.0
        out[f"{name}_weighted"] = float((scores[name] * weights).sum())
    return out


def bins_of(rows: np.ndarray, confidence: np.ndarray, correct: np.ndarray) -> dict:
    return {"bins": CALIBRATION_BINS, "rows": rows.astype(int).tolist(),
            "accuracy": np.divide(correct, rows, out=np.zeros_like(rows), where=rows > 0).round(4).tolist(),
            "confidence": np.divide(confidence, rows, out=np.zeros_like(rows), where=rows > 0).round(4).tolist()}


def uncalibrated(t: Tally, scored: int) -> dict | None:
    """ECE, NLL and the calibration bins of the probabilities before the run's temperature."""
    binned_rows = t.raw_bin_rows.sum()
    if not binned_rows or binned_rows != scored - t.no_confidence:
        return None
    return {"expected_calibration_error": float(np.abs(t.raw_bin_correct - t.raw_bin_confidence).sum()
                                                / binned_rows),
            "negative_log_likelihood": (t.raw_nll_sum / t.raw_nll_rows if t.raw_nll_rows == scored
                                        else None),
            "calibration": bins_of(t.raw_bin_rows, t.raw_bin_confidence, t.raw_bin_correct)}


def summarize(labels: LabelSet, t: Tally, target_accuracy: float | None = None) -> dict:
    """The metrics written to _metrics.json. A metric over no scored row is None (null),
    never a number: 0.0 accuracy would read as a model that is always wrong."""
    if t.multilabel is not None:
        return summarize_multilabel_run(labels, t)
    scored = int(t.confusion.sum())
    scores = per_class_scores(t.confusion)
    binned = t.bin_rows.sum()
    # ECE needs a confidence on every scored row; a backend without one gets null, not a
    # number computed over a biased subset.
    ece = (float(np.abs(t.bin_correct - t.bin_confidence).sum() / binned)
           if binned and t.no_confidence == 0 else None)
    return {
        "rows": t.rows,
        "rows_scored": scored,
        "rows_errored": t.errored,
        "gold_missing": t.gold_missing,
        "gold_outside_labels": int(sum(t.gold_unknown.values())),
        "gold_outside_labels_values": dict(t.gold_unknown.most_common(20)),
        "accuracy": float(np.trace(t.confusion) / scored) if scored else None,
        **{k: (v if scored else None) for k, v in averaged(scores).items()},
        "expected_calibration_error": ece,
        # Mean -log P(gold label); like ECE, only when every scored row has probabilities.
        "negative_log_likelihood": (t.nll_sum / t.nll_rows if scored and t.nll_rows == scored
                                    else None),
        "labels": list(labels.names),
        "per_class": {
            name: {k: (int(v[i]) if k in ("support", "predicted") else float(v[i]))
                   for k, v in scores.items()}
            for i, name in enumerate(labels.names)
        },
        "confusion_matrix": t.confusion.tolist(),
        # Before the temperature (backend.calibrated): only where one other than 1 was applied.
        "uncalibrated": uncalibrated(t, scored),
        # Which confidence threshold keeps how many rows at what accuracy (review thresholds).
        "coverage": coverage_table(t, target_accuracy),
        "calibration": bins_of(t.bin_rows, t.bin_confidence, t.bin_correct),
    }


def summarize_multilabel_run(labels: LabelSet, t: Tally) -> dict:
    """task: multi_label's metrics (multilabel.summarize_multilabel) with the run's row counts."""
    scored = t.multilabel.rows
    metrics = summarize_multilabel(t.multilabel, labels)
    if not scored:  # no scored row: every score is None, not a 0 that reads as a bad model
        metrics = {k: (v if k in ("rows", "per_label", "most_confused") else None)
                   for k, v in metrics.items()}
    return {"task": "multi_label", **metrics, "rows": t.rows, "rows_scored": scored,
            "rows_errored": t.errored, "gold_missing": t.gold_missing,
            "gold_outside_labels": int(sum(t.gold_unknown.values())),
            "gold_outside_labels_values": dict(t.gold_unknown.most_common(20)),
            "labels": list(labels.names)}
