"""Pure helpers every back end shares: which rows to classify, and how results join the chunk."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from clsjob.labels import LabelSet


def rows_to_classify(table: pa.Table) -> list[int]:
    """Rows the prepare stage did not already mark with an error."""
    return [i for i, e in enumerate(table.column("error").to_pylist()) if e is None]


def attach_probabilities(table: pa.Table, todo: Sequence[int], probs: np.ndarray,
                         labels: LabelSet, truncated: Sequence[bool]) -> pa.Table:
    """Add label / confidence / probs / truncated for rows `todo` (probs in label order);
    other rows keep their error and get nulls, so the chunk keeps every row it came with."""
    n = table.num_rows
    label: list[str | None] = [None] * n
    confidence: list[float | None] = [None] * n
    row_probs: list[list[float] | None] = [None] * n
    row_truncated: list[bool | None] = [None] * n
    best = probs.argmax(axis=1) if len(todo) else []
    for row, p, k, cut in zip(todo, probs, best, truncated):
        label[row] = labels.names[k]
        confidence[row] = float(p[k])
        row_probs[row] = p.astype(np.float32).tolist()
        row_truncated[row] = cut
    return (table
            .append_column("label", pa.array(label, pa.string()))
            .append_column("confidence", pa.array(confidence, pa.float32()))
            .append_column("probs", pa.array(row_probs, pa.list_(pa.float32())))
            .append_column("truncated", pa.array(row_truncated, pa.bool_())))
