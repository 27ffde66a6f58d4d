"""The additive counts behind every metric: a `Tally` of one part adds up with every other
part's into the run's, so a run over billions of rows evaluates part by part without holding
its predictions in one place (metrics.py turns the sums into numbers).

A Tally is a few named counters. Each owns its arrays and how it adds, writes and reads
itself; a new kind of count is one class here and one field of Tally. The JSON is flat, with
the keys shard markers have always held, so a run resumes over markers an earlier version
wrote (a counter they lack reads as zeros: no rows of that kind)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields

import numpy as np

from clsjob.evaluation.calibration import CALIBRATION_BINS
from clsjob.evaluation.multilabel import MultiLabelTally

# Accuracy against coverage: scored rows counted by confidence in bins 0.001 wide, so that
# the rows at or above any threshold k/1000 are exactly the bins from k on.
COVERAGE_BINS = 1000


@dataclass
class RowCounts:
    """Where every row went: errored, no gold label, a gold label outside the set, or scored
    (a scored row without a confidence is counted too: ECE and coverage need one on all)."""

    total: int = 0
    errored: int = 0
    gold_missing: int = 0
    gold_unknown: Counter = field(default_factory=Counter)
    no_confidence: int = 0

    @classmethod
    def empty(cls, n: int) -> "RowCounts":
        return cls()

    def add(self, other: "RowCounts") -> None:
        self.total += other.total
        self.errored += other.errored
        self.gold_missing += other.gold_missing
        self.gold_unknown.update(other.gold_unknown)
        self.no_confidence += other.no_confidence

    def to_json(self) -> dict:
        return {"rows": self.total, "errored": self.errored, "gold_missing": self.gold_missing,
                "gold_unknown": dict(self.gold_unknown), "no_confidence": self.no_confidence}

    @classmethod
    def from_json(cls, data: dict, n: int) -> "RowCounts":
        return cls(data["rows"], data["errored"], data["gold_missing"],
                   Counter(data["gold_unknown"]), data["no_confidence"])


@dataclass
class Confusion:
    """Scored rows by gold (rows) and predicted (columns) label."""

    matrix: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "Confusion":
        return cls(np.zeros((n, n), dtype=np.int64))

    def add(self, other: "Confusion") -> None:
        self.matrix += other.matrix

    def to_json(self) -> dict:
        return {"confusion": self.matrix.tolist()}

    @classmethod
    def from_json(cls, data: dict, n: int) -> "Confusion":
        return cls(np.array(data["confusion"], dtype=np.int64).reshape(n, n))


@dataclass
class Calibration:
    """Scored rows per reliability bin (their count, summed confidence and correct rows) and
    the negative log-likelihood of their gold labels."""

    PREFIX = ""  # of its JSON keys
    rows: np.ndarray = None
    confidence: np.ndarray = None
    correct: np.ndarray = None
    nll_sum: float = 0.0  # -log P(gold) summed over the scored rows that have probabilities
    nll_rows: int = 0

    def __post_init__(self) -> None:
        for name in ("rows", "confidence", "correct"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(CALIBRATION_BINS, dtype=np.float64))

    @classmethod
    def empty(cls, n: int) -> "Calibration":
        return cls()

    def count(self, bins: np.ndarray, confidence: np.ndarray, correct: np.ndarray) -> None:
        np.add.at(self.rows, bins, 1.0)
        np.add.at(self.confidence, bins, confidence)
        np.add.at(self.correct, bins, correct)

    def add(self, other: "Calibration") -> None:
        self.rows += other.rows
        self.confidence += other.confidence
        self.correct += other.correct
        self.nll_sum += other.nll_sum
        self.nll_rows += other.nll_rows

    def to_json(self) -> dict:
        p = self.PREFIX
        return {f"{p}bin_rows": self.rows.tolist(), f"{p}bin_confidence": self.confidence.tolist(),
                f"{p}bin_correct": self.correct.tolist(),
                f"{p}nll_sum": self.nll_sum, f"{p}nll_rows": self.nll_rows}

    @classmethod
    def from_json(cls, data: dict, n: int) -> "Calibration":
        # Markers written before NLL was counted have none, as for no probabilities.
        p = cls.PREFIX
        return cls(**{name: np.array(data[f"{p}bin_{name}"]) for name in ("rows", "confidence", "correct")
                      if f"{p}bin_{name}" in data},
                   nll_sum=data.get(f"{p}nll_sum", 0.0), nll_rows=data.get(f"{p}nll_rows", 0))


@dataclass
class Uncalibrated(Calibration):
    """The same counts of the probabilities before the run's temperature (softmax(logits)
    where the run reported softmax(logits / T)): written only where one was applied."""

    PREFIX = "raw_"

    def to_json(self) -> dict:
        return super().to_json() if self.rows.any() else {}


@dataclass
class Coverage:
    """Scored rows with a confidence, and the correct ones, per COVERAGE_BINS bin."""

    rows: np.ndarray
    correct: np.ndarray

    @classmethod
    def empty(cls, n: int) -> "Coverage":
        return cls(np.zeros(COVERAGE_BINS, np.int64), np.zeros(COVERAGE_BINS, np.int64))

    def count(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        fine = coverage_bin(confidence)
        np.add.at(self.rows, fine, 1)
        np.add.at(self.correct, fine, correct.astype(np.int64))

    def add(self, other: "Coverage") -> None:
        self.rows += other.rows
        self.correct += other.correct

    def to_json(self) -> dict:
        # Sparse, [bin, rows, correct]: a part's confidences fill few of the 1,000 bins.
        return {"coverage": [[int(i), int(self.rows[i]), int(self.correct[i])]
                             for i in np.flatnonzero(self.rows)]}

    @classmethod
    def from_json(cls, data: dict, n: int) -> "Coverage":
        # Markers written before coverage was counted have none: zeros, as for no rows.
        c = cls.empty(n)
        for i, rows, correct in data.get("coverage", []):
            c.rows[i], c.correct[i] = rows, correct
        return c


@dataclass
class Distribution:
    """Every labelled row, gold label or not (monitor.py: the run's distribution and its
    drift): rows per predicted label (in a multi-label run, each label given), and rows
    with a confidence per COVERAGE_BINS bin, with their sum."""

    label_counts: np.ndarray
    confidence_counts: np.ndarray
    confidence_sum: float = 0.0

    @classmethod
    def empty(cls, n: int) -> "Distribution":
        return cls(np.zeros(n, dtype=np.int64), np.zeros(COVERAGE_BINS, dtype=np.int64))

    def count_confidences(self, confidences: list[float]) -> None:
        every = np.array(confidences, dtype=np.float64)
        np.add.at(self.confidence_counts, coverage_bin(every), 1)
        self.confidence_sum = float(every.sum())

    def add(self, other: "Distribution") -> None:
        self.label_counts += other.label_counts
        self.confidence_counts += other.confidence_counts
        self.confidence_sum += other.confidence_sum

    def to_json(self) -> dict:
        return {"label_counts": self.label_counts.tolist(),
                "confidence_counts": [[int(i), int(self.confidence_counts[i])]
                                      for i in np.flatnonzero(self.confidence_counts)],
                "confidence_sum": self.confidence_sum}

    @classmethod
    def from_json(cls, data: dict, n: int) -> "Distribution":
        d = cls.empty(n)
        if "label_counts" in data:
            d.label_counts = np.array(data["label_counts"], dtype=np.int64)
        d.confidence_counts = binned(data.get("confidence_counts", []))
        d.confidence_sum = data.get("confidence_sum", 0.0)
        return d


@dataclass
class Tally:
    """The counters of a set of rows, for `n_labels` labels. A multi-label run's per-label
    counts are in `multilabel` (task.py adds it) and the single-label ones (confusion,
    calibration, coverage) stay empty."""

    n_labels: int
    rows: RowCounts = None
    confusion: Confusion = None
    calibration: Calibration = None
    uncalibrated: Uncalibrated = None
    coverage: Coverage = None
    distribution: Distribution = None
    multilabel: MultiLabelTally | None = None

    def __post_init__(self) -> None:
        for name, counter in self.counters():
            if counter is None:
                setattr(self, name, COUNTERS[name].empty(self.n_labels))

    def counters(self):
        """(name, counter) of each counter every Tally has (multilabel is the task's)."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if f.name in COUNTERS]

    def add(self, other: "Tally") -> "Tally":
        for name, counter in self.counters():
            counter.add(getattr(other, name))
        if other.multilabel is not None:
            if self.multilabel is None:
                self.multilabel = MultiLabelTally(self.n_labels)
            self.multilabel.add(other.multilabel)
        return self

    def to_json(self) -> dict:
        out = {"n_labels": self.n_labels}
        for _, counter in self.counters():
            out.update(counter.to_json())
        if self.multilabel is not None:
            out["multilabel"] = self.multilabel.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Tally":
        n = data["n_labels"]
        return cls(n, **{name: counter.from_json(data, n) for name, counter in COUNTERS.items()},
                   multilabel=(MultiLabelTally.from_json(data["multilabel"])
                               if "multilabel" in data else None))


COUNTERS = {"rows": RowCounts, "confusion": Confusion, "calibration": Calibration,
            "uncalibrated": Uncalibrated, "coverage": Coverage, "distribution": Distribution}


def coverage_bin(confidence: np.ndarray) -> np.ndarray:
    """Bin k holds confidences in [k/1000, (k+1)/1000); 1.0 goes into the last."""
    return np.clip(np.floor(confidence * COVERAGE_BINS).astype(np.int64), 0, COVERAGE_BINS - 1)


def binned(entries: list[list[int]]) -> np.ndarray:
    """[bin, rows] pairs back into COVERAGE_BINS counts."""
    counts = np.zeros(COVERAGE_BINS, np.int64)
    for i, n in entries:
        counts[i] = n
    return counts
