"""Multi-label classification's pure parts (issue 16), in numpy: the additive counts behind
its metrics, per-label decision thresholds tuned on eval rows, and a prompted LLM's answer
schema and parser; and how a row's probabilities become its labels and confidence. Each
part is checked on its own (against scikit-learn where there is one).

A row's gold and predicted labels are sets of label ids; `n` is the number of labels."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from clsjob.labels import LabelSet
from clsjob.prompts import load_json_answer, reasoning_schema


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

    def to_json(self) -> dict:
        # confused is n x n and mostly zeros: [gold, predicted, rows] of the pairs that occur.
        return {"n": self.n, "rows": self.rows, "exact": self.exact,
                "wrong_slots": self.wrong_slots, "gold_labels": self.gold_labels,
                "predicted_labels": self.predicted_labels, "tp": self.tp.tolist(),
                "fp": self.fp.tolist(), "fn": self.fn.tolist(),
                "confused": [[int(a), int(b), int(self.confused[a, b])]
                             for a, b in zip(*np.nonzero(self.confused))]}

    @classmethod
    def from_json(cls, data: dict) -> "MultiLabelTally":
        t = cls(data["n"], rows=data["rows"], exact=data["exact"], wrong_slots=data["wrong_slots"],
                gold_labels=data["gold_labels"], predicted_labels=data["predicted_labels"],
                **{k: np.array(data[k], dtype=np.int64) for k in ("tp", "fp", "fn")})
        for a, b, rows in data["confused"]:
            t.confused[a, b] = rows
        return t


def count_multilabel(n: int, gold: Iterable[Iterable[int]], predicted: Iterable[Iterable[int]]) -> MultiLabelTally:
    """The counts of rows given as sets of label ids."""
    gold, predicted = list(gold), list(predicted)
    return count_multihot(multihot(n, gold), multihot(n, predicted))


def multihot(n: int, rows: list[Iterable[int]]) -> np.ndarray:
    out = np.zeros((len(rows), n), dtype=bool)
    for i, ids in enumerate(rows):
        out[i, list(ids)] = True
    return out


def count_multihot(gold: np.ndarray, predicted: np.ndarray) -> MultiLabelTally:
    """The counts of rows given as rows x labels booleans."""
    gold, predicted = np.asarray(gold, dtype=bool), np.asarray(predicted, dtype=bool)
    missed, extra = gold & ~predicted, predicted & ~gold
    return MultiLabelTally(
        gold.shape[1], rows=len(gold), exact=int((gold == predicted).all(axis=1).sum()),
        wrong_slots=int((gold ^ predicted).sum()), gold_labels=int(gold.sum()),
        predicted_labels=int(predicted.sum()), tp=(gold & predicted).sum(axis=0).astype(np.int64),
        fp=extra.sum(axis=0).astype(np.int64), fn=missed.sum(axis=0).astype(np.int64),
        # confused[a, b]: rows where gold a was missed while b, not gold, was predicted.
        confused=missed.T.astype(np.int64) @ extra.astype(np.int64))


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


def answer_schema(labels: LabelSet, reasoning_max_chars: int | None = None,
                  length_in_grammar: bool = True) -> dict:
    """The JSON schema a prompted LLM answers under: a list of labels of the set (empty when
    none applies), at most one of each, and optionally a short reason (written as
    prompts.reasoning_schema says, after the labels, so that an answer cut inside it keeps them).

    Not `uniqueItems`: guidance, the structured-outputs library clsjob runs by default,
    refuses the whole schema over it ("Unimplemented keys"). The list is capped at the number
    of labels instead, and a label given twice counts once (parse_answer)."""
    properties = {"labels": {"type": "array", "items": {"type": "string", "enum": list(labels.names)},
                             "maxItems": len(labels)}}
    if reasoning_max_chars:
        properties["reasoning"] = reasoning_schema(reasoning_max_chars, length_in_grammar)
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


def parse_answer(text: str, labels: LabelSet) -> tuple[list[str] | None, str | None]:
    """(labels in the set's order, each once, None) from an answer, or (None, why) when it
    is not one: not JSON, no `labels` list, or a label outside the set. An answer cut short
    inside its reasoning still gives its labels."""
    try:
        answer, _ = load_json_answer(text)
    except json.JSONDecodeError as exc:
        return None, f"answer is not JSON ({exc.msg})"
    given = answer.get("labels") if isinstance(answer, dict) else None
    if not isinstance(given, list) or not all(isinstance(x, str) for x in given):
        return None, "answer has no list of labels"
    unknown = [x for x in given if x not in labels]
    if unknown:
        return None, f"answer names labels outside the set: {unknown}"
    return [name for name in labels.names if name in given], None


def decide(probs: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(which labels apply, each row's confidence) from per-label probabilities.

    A label applies where its probability is at least its threshold. The confidence is how
    far the row's closest call is from its threshold, scaled per label so that 0 is on the
    threshold and 1 is at 0 or 1 probability: min over labels of (p - t) / (1 - t) for a
    label given, (t - p) / t for one not given. The minimum, not the mean: a row's set of
    labels is only as sure as its least sure decision, and a mean over dozens of labels that
    are plainly absent would call almost every row sure."""
    probs = np.asarray(probs, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)[None, :]
    applies = probs >= t
    distance = np.where(applies, (probs - t) / np.maximum(1 - t, 1e-12), (t - probs) / np.maximum(t, 1e-12))
    confidence = distance.min(axis=1) if probs.shape[1] else np.ones(len(probs))
    return applies, np.clip(confidence, 0.0, 1.0)
