"""Rows for review (active learning): the rows a person should label first, chosen without a
second pass over the output.

Each written part keeps its own best `n` candidates (ranked by how unsure the model was),
they travel to the driver with the part's record and are kept per shard in its marker (so a
resumed run still has them), and the driver merges them into the run's best `n`. Ranking is
deterministic: by score, ties by id. The top `n` of the union of the parts' top `n` lists is
the top `n` of all rows, so the merge loses nothing.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pyarrow as pa

from clsjob import store
from clsjob.config import MAX_REVIEW_ROWS, ReviewConfig, StorageConfig

REVIEW = "_review/review.parquet"


def review_size(rule: ReviewConfig, rows_in: int) -> int:
    """Rows to pick (per label with per_label): `rows`, or `fraction` of the run's rows."""
    n = rule.rows if rule.rows is not None else math.ceil(rule.fraction * rows_in)
    return min(n, MAX_REVIEW_ROWS)


def uncertainty(probs: np.ndarray, strategy: str) -> np.ndarray:
    """Higher = review first. least_confident: 1 - top probability; margin: minus the gap
    between the top two; entropy: of the whole distribution (nats)."""
    probs = np.asarray(probs, dtype=np.float64)
    if strategy == "least_confident":
        return 1.0 - probs.max(axis=1)
    if strategy == "margin":
        top2 = np.sort(probs, axis=1)[:, -2:] if probs.shape[1] > 1 else np.hstack([np.zeros_like(probs), probs])
        return -(top2[:, 1] - top2[:, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(probs > 0, probs * np.log(probs), 0.0).sum(axis=1)


def best(candidates: Iterable[dict], n: int, per_label: bool) -> list[dict]:
    """The first `n` by (score high to low, id), or the first `n` of each label."""
    ranked = sorted(candidates, key=lambda c: (-c["score"], c["id"]))
    if not per_label:
        return ranked[:n]
    kept: dict[str, int] = {}
    out = []
    for c in ranked:
        if kept.get(c["label"], 0) < n:
            kept[c["label"]] = kept.get(c["label"], 0) + 1
            out.append(c)
    return out


def part_candidates(written: pa.Table, texts: list, id_column: str, gold_column: str | None,
                    rule: ReviewConfig, n: int, task) -> list[dict]:
    """A written part's best `n` rows to review; rows without probabilities (errors) have
    nothing to rank and are left out. `texts`: the part's texts, row for row (the output
    may not keep them)."""
    has = written.column("probs").is_valid().to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(has)
    if not len(rows) or n == 0:
        return []
    k = len(written.column("probs")[int(rows[0])])
    probs = np.asarray(written.column("probs").take(rows).combine_chunks().flatten(),
                       dtype=np.float64).reshape(len(rows), k)
    conf = written.column("confidence").to_pylist()
    # The `task` (task.py) ranks the rows and names the answer's column.
    label_key = task.answer
    scores = task.review_scores(probs, [conf[i] for i in rows.tolist()], rule.strategy)
    ids, labels = written.column(id_column).to_pylist(), written.column(label_key).to_pylist()
    gold = written.column(gold_column).to_pylist() if gold_column else None
    candidates = [{"id": ids[i], "text": texts[i], label_key: labels[i], "confidence": conf[i],
                   "probs": probs[j].tolist(), "score": float(scores[j]),
                   **({"gold": gold[i]} if gold is not None else {})}
                  for j, i in ((j, int(rows[j])) for j in short_list(
                      scores, [labels[i] for i in rows.tolist()], n, rule.per_label))]
    return best(candidates, n, rule.per_label)


def short_list(scores: np.ndarray, labels: list, n: int, per_label: bool) -> np.ndarray:
    """Positions that can be among the best `n` (of each label, with per_label): those
    scoring at least the n-th highest, ties at the cut kept for `best` to break by id. Only
    these become candidates, not every row of the part."""
    groups = [np.arange(len(scores))]
    if per_label:
        by_label = np.asarray(labels, dtype=object)
        groups = [np.flatnonzero(by_label == label) for label in dict.fromkeys(labels)]
    kept = []
    for group in groups:
        if len(group) > n:
            cut = np.partition(scores[group], len(group) - n)[len(group) - n]
            group = group[scores[group] >= cut]
        kept.append(group)
    return np.sort(np.concatenate(kept))


def write_run_review(rule: ReviewConfig, markers: list[dict], n: int, output: str,
                     storage: StorageConfig) -> dict:
    """The run's best rows to review, from its shard markers, written; the manifest's entry."""
    picked = best((c for m in markers for c in m.get("review", [])), n, rule.per_label)
    write_review(picked, output, storage)
    return {"path": REVIEW, "rows": len(picked), **rule.model_dump()}


def write_review(candidates: list[dict], output: str, storage: StorageConfig) -> None:
    """The picked rows, most uncertain first, with their rank, as `_review/review.parquet`."""
    table = pa.Table.from_pylist([{"rank": r, **c} for r, c in enumerate(candidates, 1)])
    if not candidates:
        table = pa.table({"rank": pa.array([], pa.int64())})
    store.write_part(table, store.join(output, REVIEW), storage)
