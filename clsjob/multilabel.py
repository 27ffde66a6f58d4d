"""Multi-label classification's pure parts (issue 16), in numpy: the additive counts behind
its metrics, per-label decision thresholds tuned on eval rows, and a prompted LLM's answer
schema and parser. Not yet wired into fine-tuning or the pipeline: each part is checked on
its own (against scikit-learn where there is one) so the wiring only has to call them.

A row's gold and predicted labels are sets of label ids; `n` is the number of labels."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from clsjob.labels import LabelSet


@dataclass
class MultiLabelTally:
    """Counts that add up across parts: per label true positives, false positives and false
    negatives; rows whose predicted set equals the gold set; label slots wrong (for Hamming
    loss); gold and predicted labels in all (cardinality); and `confused[a, b]`: rows where
    gold label a was missed while label b, not gold, was predicted (the pairs mixed up)."""

    n: int
    rows: int = 0
    exact: int = 0
    wrong_slots: int = 0
    gold_labels: int = 0
    predicted_labels: int = 0
    tp: np.ndarray = None
    fp: np.ndarray = None
    fn: np.ndarray = None
    confused: np.ndarray = field(default=None)

    def __post_init__(self) -> None:
        for name in ("tp", "fp", "fn"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.n, dtype=np.int64))
        if self.confused is None:
            self.confused = np.zeros((self.n, self.n), dtype=np.int64)

    def add(self, other: "MultiLabelTally") -> None:
        self.rows += other.rows
        self.exact += other.exact
        self.wrong_slots += other.wrong_slots
        self.gold_labels += other.gold_labels
        self.predicted_labels += other.predicted_labels
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.confused += other.confused


def count_multilabel(n: int, gold: Iterable[Iterable[int]], predicted: Iterable[Iterable[int]]) -> MultiLabelTally:
    t = MultiLabelTally(n)
    for g, p in zip(gold, predicted):
        g, p = set(g), set(p)
        t.rows += 1
        t.exact += g == p
        t.wrong_slots += len(g ^ p)
        t.gold_labels += len(g)
        t.predicted_labels += len(p)
        for k in g & p:
            t.tp[k] += 1
        for k in p - g:
            t.fp[k] += 1
        for k in g - p:
            t.fn[k] += 1
            for b in p - g:
                t.confused[k, b] += 1
    return t


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def summarize_multilabel(t: MultiLabelTally, labels: LabelSet, top_pairs: int = 10) -> dict:
    """Micro-, macro- and weighted precision / recall / F1, per-label scores and support,
    subset accuracy, Hamming loss, label cardinality of gold and predicted, and the most
    confused pairs. A ratio over nothing is 0 (scikit-learn's zero_division=0); a metric over
    no rows is None."""
    support = t.tp + t.fn
    precision, recall = _ratio(t.tp, t.tp + t.fp), _ratio(t.tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    weights = _ratio(support, np.full(t.n, support.sum()))
    micro_p = float(_ratio(t.tp.sum(), t.tp.sum() + t.fp.sum()))
    micro_r = float(_ratio(t.tp.sum(), support.sum()))
    micro_f1 = float(_ratio(2 * micro_p * micro_r, micro_p + micro_r))
    pairs = sorted(((int(t.confused[a, b]), labels.names[a], labels.names[b])
                    for a, b in zip(*np.nonzero(t.confused))), key=lambda x: (-x[0], x[1], x[2]))
    rows = t.rows or None
    return {
        "rows": t.rows,
        "subset_accuracy": t.exact / rows if rows else None,
        "hamming_loss": t.wrong_slots / (t.rows * t.n) if rows and t.n else None,
        "label_cardinality": {"gold": t.gold_labels / rows if rows else None,
                              "predicted": t.predicted_labels / rows if rows else None},
        "precision_micro": micro_p, "recall_micro": micro_r, "f1_micro": micro_f1,
        **{f"{name}_macro": float(values.mean()) if t.n else 0.0
           for name, values in (("precision", precision), ("recall", recall), ("f1", f1))},
        **{f"{name}_weighted": float((values * weights).sum())
           for name, values in (("precision", precision), ("recall", recall), ("f1", f1))},
        "per_label": {name: {"precision": float(precision[k]), "recall": float(recall[k]),
                             "f1": float(f1[k]), "support": int(support[k])}
                      for k, name in enumerate(labels.names)},
        "most_confused": [{"gold": a, "predicted": b, "rows": count} for count, a, b in pairs[:top_pairs]],
    }


def tune_thresholds(probs: np.ndarray, gold: np.ndarray, min_support: int = 5,
                    default: float = 0.5, grid: np.ndarray | None = None) -> np.ndarray:
    """Per label, the threshold (predict the label where its probability is at least it) that
    maximises the label's F1 on these eval rows; the lowest such threshold on ties. The
    floor that keeps rare labels from being silenced: a label with fewer than `min_support`
    gold rows here keeps `default`, since a threshold fitted to one or two rows (or to none,
    where F1 is 0 everywhere and "never" would win) says nothing of the next run."""
    probs, gold = np.asarray(probs, dtype=np.float64), np.asarray(gold, dtype=bool)
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2) if grid is None else np.asarray(grid)
    out = np.full(probs.shape[1], default, dtype=np.float64)
    for k in range(probs.shape[1]):
        if gold[:, k].sum() < min_support:
            continue
        predicted = probs[:, k][:, None] >= grid[None, :]
        tp = (predicted & gold[:, k][:, None]).sum(axis=0)
        f1 = _ratio(2 * tp, predicted.sum(axis=0) + gold[:, k].sum())
        out[k] = grid[int(np.argmax(f1))]  # argmax: the first (lowest) of equal F1s
    return out


def answer_schema(labels: LabelSet, reasoning_max_chars: int | None = None) -> dict:
    """The JSON schema a prompted LLM answers under: a list of distinct labels of the set
    (empty when none applies), and optionally a short reason."""
    properties = {"labels": {"type": "array", "items": {"type": "string", "enum": list(labels.names)},
                             "uniqueItems": True}}
    if reasoning_max_chars:
        properties["reasoning"] = {"type": "string", "maxLength": reasoning_max_chars}
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def parse_answer(text: str, labels: LabelSet) -> tuple[list[str] | None, str | None]:
    """(labels in the set's order, None) from an answer, or (None, why) when it is not one:
    not JSON, no `labels` list, a label outside the set, or one given twice."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"answer is not JSON ({exc.msg})"
    given = answer.get("labels") if isinstance(answer, dict) else None
    if not isinstance(given, list) or not all(isinstance(x, str) for x in given):
        return None, "answer has no list of labels"
    unknown = [x for x in given if x not in labels]
    if unknown:
        return None, f"answer names labels outside the set: {unknown}"
    if len(set(given)) != len(given):
        return None, "answer names a label twice"
    return [name for name in labels.names if name in given], None
