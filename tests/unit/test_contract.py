"""The output contract: typed columns even when all null, and the part record's round trip
through the write stage's Arrow row."""
from __future__ import annotations

import numpy as np
import pytest
import pyarrow as pa

from clsjob.backends.rows import attach_probabilities, attach_results, stamp
from clsjob.config import ClassifyConfig, validate
from clsjob.contract import (BUSY, CLEANED, DTYPE, GOLD, PART, PART_ROWS, RESULT_FIELDS, SHARD, PartRecord,
                             output_columns, output_table)
from clsjob.labels import LabelSet
from clsjob.run.prepare import prepare_chunk
from clsjob.task import SINGLE_LABEL

LABELS = LabelSet(("neg", "pos"))


def config(**backend) -> ClassifyConfig:
    return validate({"input": {"path": "in", "label_column": "y", "carry_columns": ["lang"]},
                     "labels": list(LABELS.names), "backend": {"model": "m", **backend},
                     "output": {"path": "out"}}, model=ClassifyConfig)


def chunk(texts: list[str | None]) -> pa.Table:
    table = pa.table({"text": texts, "y": ["pos"] * len(texts), "lang": ["en"] * len(texts)})
    return prepare_chunk(table, "s.parquet", 0, config().input)


def test_a_part_whose_rows_all_errored_keeps_its_result_types():
    prepared = chunk([None, "", "  "])
    labelled = attach_results(prepared, [], LABELS, [], [])  # nothing left to classify
    written = output_table(labelled, config())
    assert written.column_names == ["id", "text", GOLD, "lang", "label", "confidence", "probs",
                                    "truncated", "error"]
    for name in ("label", "confidence", "probs", "truncated", "error"):
        assert written.schema.field(name).type == RESULT_FIELDS[name]
    assert written.column("error").to_pylist() == ["text is null", "text is empty", "text is empty"]
    assert not set(written.column_names) & {SHARD, PART, PART_ROWS, CLEANED}


def test_reasoning_is_written_only_by_json_prompts():
    assert "reasoning" not in output_columns(config())
    prompted = config(kind="vllm_prompt", prompt={"mode": "json"})
    assert output_columns(prompted)[-2:] == ["reasoning", "error"]
    assert "reasoning" not in output_columns(config(kind="vllm_prompt"))


def test_part_record_counts_the_part_and_survives_the_trip_to_the_driver():
    prepared = chunk(["good", "bad", None, "fine"])
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], dtype=np.float32)
    labelled = attach_probabilities(prepared, [0, 1, 3], probs, LABELS, [False, True, False], SINGLE_LABEL)
    labelled = stamp(labelled, "bfloat16", 0.5)
    written = output_table(labelled, config())
    assert DTYPE not in written.column_names and BUSY not in written.column_names
    record = PartRecord.of(written, labelled, LABELS, SINGLE_LABEL)
    assert record.busy_s == pytest.approx(0.5)  # the model's seconds, summed back from the rows
    assert record.entry() == {"part": "s-0000000000.parquet", "rows": 4, "errored": 1,
                              "truncated": 1, "cleaned": 0, "dtype": "bfloat16"}
    assert (record.shard, record.counts.rows.total, record.counts.rows.errored) == ("s.parquet", 4, 1)
    # gold is "pos" everywhere: rows 0 and 3 right, row 1 wrong
    assert record.counts.confusion.matrix.tolist() == [[0, 0], [1, 2]]
    back = PartRecord.from_row(pa.Table.from_pylist([record.to_row()]).to_pylist()[0])
    assert back.entry() == record.entry() and back.shard == record.shard
    assert back.busy_s == record.busy_s
    assert back.counts.to_json() == record.counts.to_json()


def test_every_internal_column_is_made_by_prepare():
    prepared = chunk(["a"])
    assert {SHARD, PART, PART_ROWS, CLEANED} <= set(prepared.column_names)
