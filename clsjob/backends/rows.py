"""Pure helpers every back end shares: which rows to classify, and how results join the chunk."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from clsjob.contract import BUSY, DTYPE, RESULT_FIELDS
from clsjob.labels import LabelSet


def rows_to_classify(table: pa.Table) -> list[int]:
    """Rows the prepare stage did not already mark with an error."""
    return [i for i, e in enumerate(table.column("error").to_pylist()) if e is None]


def attach_probabilities(table: pa.Table, todo: Sequence[int], probs: np.ndarray, labels: LabelSet,
                         truncated: Sequence[bool], task, thresholds: np.ndarray | None = None,
                         ood_score: np.ndarray | None = None) -> pa.Table:
    """Add the task's answer / confidence / probs / truncated (and `ood_score` where given)
    for rows `todo` (probs in label order; `thresholds`: a multi-label head's,
    task.model_thresholds); other rows keep their error and get nulls, so the chunk keeps
    every row it came with."""
    answers, confidence = task.decide(probs, thresholds) if len(todo) else ([], [])
    return attach_results(table, todo, labels, answers, truncated, probs=probs,
                          confidence=confidence, column=task.answer, ood_score=ood_score)


def attach_results(table: pa.Table, todo: Sequence[int], labels: LabelSet,
                   answers: Sequence[int | list[int] | None], truncated: Sequence[bool], *,
                   probs: np.ndarray | None = None, errors: Sequence[str | None] | None = None,
                   reasoning: Sequence[str | None] | None = None,
                   confidence: Sequence[float] | None = None, column: str = "label",
                   ood_score: Sequence[float] | None = None) -> pa.Table:
    """Join one result per row of `todo` to the chunk, in the answer `column` (the task's):
    a label index, or a list of them (a set of labels), or None with an error. `probs` fills
    probs and the confidence (the answer's probability, or `confidence`'s where given);
    `reasoning` adds that column (json mode), `ood_score` that one (abstain.score:
    distance)."""
    n = table.num_rows
    label: list = [None] * n
    row_confidence: list[float | None] = [None] * n
    row_probs: list[list[float] | None] = [None] * n
    row_truncated: list[bool | None] = [None] * n
    row_reasoning: list[str | None] = [None] * n
    row_ood: list[float | None] = [None] * n
    error = table.column("error").to_pylist()
    for j, row in enumerate(todo):
        row_truncated[row] = truncated[j]
        if errors is not None and errors[j] is not None:
            error[row] = errors[j]
            continue
        k = answers[j]
        label[row] = [labels.names[x] for x in k] if isinstance(k, list) else labels.names[k]
        if probs is not None:
            row_confidence[row] = float(confidence[j] if confidence is not None else probs[j][k])
            row_probs[row] = probs[j].astype(np.float32).tolist()
        if reasoning is not None:
            row_reasoning[row] = reasoning[j]
        if ood_score is not None:
            row_ood[row] = float(ood_score[j])
    results = {column: label, "confidence": row_confidence, "probs": row_probs,
               "truncated": row_truncated}
    if reasoning is not None:
        results["reasoning"] = row_reasoning
    if ood_score is not None:
        results["ood_score"] = row_ood
    results["error"] = error
    out = table.drop_columns(["error"])
    for name, values in results.items():
        out = out.append_column(name, pa.array(values, RESULT_FIELDS[name]))
    return out


def stamp(table: pa.Table, dtype: str, busy_s: float) -> pa.Table:
    """Record beside the chunk's rows what the model ran in, and the seconds it computed for
    them (shared evenly, so a part's rows add up to its chunk's); the writer moves both to
    the part's record (on a cluster of mixed CPUs, parts may differ in dtype)."""
    n = table.num_rows
    return (table.append_column(DTYPE, pa.array([dtype] * n, pa.string()))
            .append_column(BUSY, pa.array([busy_s / n if n else 0.0] * n, pa.float64())))
