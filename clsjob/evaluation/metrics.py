"""Classification metrics in pure numpy (checked against scikit-learn in the unit tests).

Metrics are computed from a `Tally` (tally.py) of counts that adds up across output parts: here
is how a batch of output rows is counted, and how the run's counts become its metrics.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from clsjob.evaluation.calibration import CALIBRATION_BINS, calibration_bin
from clsjob.evaluation.multilabel import count_multilabel, summarize_multilabel
from clsjob.evaluation.tally import COVERAGE_BINS, RowCounts, Tally
from clsjob.labels import LabelSet
from clsjob.model_folder import rescale_probs

COVERAGE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


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
    t = Tally(len(labels))
    t.rows.total = len(gold)
    y_true, y_pred, conf = [], [], []
    every_conf, raw = [], []  # raw: (scored row, its probabilities) to unscale
    for i, (g, p, c, e) in enumerate(zip(gold, predicted, confidence, errors)):
        if e is None and p in labels:  # the run's distribution: every labelled row
            t.distribution.label_counts[labels.id_of(p)] += 1
            if c is not None:
                every_conf.append(c)
        if e is not None:
            t.rows.errored += 1
        elif g is None:
            t.rows.gold_missing += 1
        elif g not in labels:
            t.rows.gold_unknown[g] += 1
        else:
            y_true.append(labels.id_of(g))
            y_pred.append(labels.id_of(p))
            conf.append(c)
            # A gold fallback label (abstention) has no probability of its own: no NLL term.
            if probs is not None and probs[i] is not None and y_true[-1] < len(probs[i]):
                t.calibration.nll_sum -= math.log(max(probs[i][y_true[-1]], 1e-12))  # as calibration.nll
                t.calibration.nll_rows += 1
            if probs is not None and probs[i] is not None and temperature not in (None, 1.0):
                raw.append((len(y_true) - 1, probs[i]))
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    t.confusion.matrix += confusion_matrix(y_true, y_pred, len(labels))
    has_conf = np.array([c is not None for c in conf], dtype=bool)
    t.rows.no_confidence = int((~has_conf).sum())
    scored_conf = np.array([c for c in conf if c is not None], dtype=np.float64)
    correct = (y_true == y_pred)[has_conf].astype(np.float64)
    t.calibration.count(calibration_bin(scored_conf), scored_conf, correct)
    t.distribution.count_confidences(every_conf)
    t.coverage.count(scored_conf, correct)
    if raw:
        count_unscaled(t, raw, y_true, y_pred, temperature)
    return t


def count_multilabel_rows(labels: LabelSet, gold: Sequence[Sequence[str] | None],
                          predicted: Sequence[Sequence[str] | None],
                          confidence: Sequence[float | None], errors: Sequence[str | None]) -> Tally:
    """count_rows for a multi-label run, where a row's gold and predicted labels are lists.
    Rows that errored, have no gold list, or name a gold label outside the set are counted
    and left out of the scores (an empty gold list is a row no label applies to: scored)."""
    t = Tally(len(labels))
    t.rows.total = len(gold)
    scored_gold, scored_pred, every_conf = [], [], []
    for g, p, c, e in zip(gold, predicted, confidence, errors):
        if e is not None:
            t.rows.errored += 1
            continue
        for name in p or ():
            t.distribution.label_counts[labels.id_of(name)] += 1
        if c is not None:
            every_conf.append(c)
        unknown = [x for x in g or () if x not in labels]
        if g is None:
            t.rows.gold_missing += 1
        elif unknown:
            t.rows.gold_unknown[unknown[0]] += 1
        else:
            scored_gold.append([labels.id_of(x) for x in g])
            scored_pred.append([labels.id_of(x) for x in p or ()])
    t.multilabel = count_multilabel(len(labels), scored_gold, scored_pred)
    t.distribution.count_confidences(every_conf)
    return t


def count_unscaled(t: Tally, raw: list[tuple[int, Sequence[float]]], y_true: np.ndarray,
                   y_pred: np.ndarray, temperature: float) -> None:
    """Calibration bins and NLL of softmax(logits) for scored rows reported as
    softmax(logits / T). The label is the same either way (a temperature never changes the
    top label), so a row is right or wrong alike before and after."""

    rows = np.array([r for r, _ in raw])
    unscaled = rescale_probs(np.array([p for _, p in raw], dtype=np.float64), 1 / temperature)
    confidence = unscaled.max(axis=1)
    t.uncalibrated.count(calibration_bin(confidence), confidence,
                         (y_true[rows] == y_pred[rows]).astype(np.float64))
    gold = y_true[rows]
    inside = gold < unscaled.shape[1]  # a gold fallback label has no probability
    t.uncalibrated.nll_sum -= float(np.log(np.maximum(unscaled[inside, gold[inside]], 1e-12)).sum())
    t.uncalibrated.nll_rows += int(inside.sum())


def coverage_table(t: Tally, target_accuracy: float | None) -> dict | None:
    """For each threshold, the share of scored rows whose confidence is at or above it and
    their accuracy; and the lowest threshold (in steps of 0.001) whose rows reach
    `target_accuracy`, with its coverage. None without confidences (generating modes)."""
    total = int(t.coverage.rows.sum())
    if not total or t.rows.no_confidence:
        return None
    # Rows and correct rows at or above bin k, for every k.
    rows_from = np.cumsum(t.coverage.rows[::-1])[::-1]
    correct_from = np.cumsum(t.coverage.correct[::-1])[::-1]

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
    raw = t.uncalibrated
    binned_rows = raw.rows.sum()
    if not binned_rows or binned_rows != scored - t.rows.no_confidence:
        return None
    return {"expected_calibration_error": float(np.abs(raw.correct - raw.confidence).sum()
                                                / binned_rows),
            "negative_log_likelihood": (raw.nll_sum / raw.nll_rows if raw.nll_rows == scored
                                        else None),
            "calibration": bins_of(raw.rows, raw.confidence, raw.correct)}


def summarize(labels: LabelSet, t: Tally, target_accuracy: float | None = None) -> dict:
    """A single-label run's metrics, written to _metrics.json. A metric over no scored row is None (null),
    never a number: 0.0 accuracy would read as a model that is always wrong."""
    confusion, cal = t.confusion.matrix, t.calibration
    scored = int(confusion.sum())
    scores = per_class_scores(confusion)
    binned = cal.rows.sum()
    # ECE needs a confidence on every scored row; a backend without one gets null, not a
    # number computed over a biased subset.
    ece = (float(np.abs(cal.correct - cal.confidence).sum() / binned)
           if binned and t.rows.no_confidence == 0 else None)
    counts = row_counts(t.rows)
    return {
        "rows": counts.pop("rows"),
        "rows_scored": scored,
        **counts,
        "accuracy": float(np.trace(confusion) / scored) if scored else None,
        **{k: (v if scored else None) for k, v in averaged(scores).items()},
        "expected_calibration_error": ece,
        # Mean -log P(gold label); like ECE, only when every scored row has probabilities.
        "negative_log_likelihood": (cal.nll_sum / cal.nll_rows if scored and cal.nll_rows == scored
                                    else None),
        "labels": list(labels.names),
        "per_class": {
            name: {k: (int(v[i]) if k in ("support", "predicted") else float(v[i]))
                   for k, v in scores.items()}
            for i, name in enumerate(labels.names)
        },
        "confusion_matrix": confusion.tolist(),
        # Before the temperature (backend.calibrated): only where one other than 1 was applied.
        "uncalibrated": uncalibrated(t, scored),
        # Which confidence threshold keeps how many rows at what accuracy (review thresholds).
        "coverage": coverage_table(t, target_accuracy),
        "calibration": bins_of(cal.rows, cal.confidence, cal.correct),
    }


def summarize_multilabel_run(labels: LabelSet, t: Tally) -> dict:
    """A multi-label run's metrics (multilabel.summarize_multilabel) with its row counts."""
    scored = t.multilabel.rows
    metrics = summarize_multilabel(t.multilabel, labels)
    if not scored:  # no scored row: every score is None, not a 0 that reads as a bad model
        metrics = {k: (v if k in ("rows", "per_label", "most_confused") else None)
                   for k, v in metrics.items()}
    counts = row_counts(t.rows)
    return {**metrics, "rows": counts.pop("rows"), "rows_scored": scored,
            **counts, "labels": list(labels.names)}


def row_counts(rows: RowCounts) -> dict:
    """Where the rows went, as _metrics.json reports it."""
    return {"rows": rows.total, "rows_errored": rows.errored, "gold_missing": rows.gold_missing,
            "gold_outside_labels": int(sum(rows.gold_unknown.values())),
            "gold_outside_labels_values": dict(rows.gold_unknown.most_common(20))}
