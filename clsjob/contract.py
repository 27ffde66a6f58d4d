"""The output contract in one place: the columns of a labelled part and their Arrow types, the
internal columns that travel between stages, the files a run writes beside its parts, and the
record each written part leaves for the shard markers and the manifest.

A new output column is one entry in RESULT_FIELDS (and the back end that fills it)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from clsjob.config import ClassifyConfig, InputConfig
from clsjob.evaluation.tally import Tally
from clsjob.labels import LabelSet
from clsjob.task import TASKS, Task

# Row ids derived from shard and row number when input.id_column is not set.
DERIVED_ID = "id"
# Gold labels are written under their own name: input corpora very often call them "label",
# which is the name of the prediction column.
GOLD = "gold"
# The columns a back end adds, in output order, with their types: a part whose rows all
# errored still has a typed (all-null) label column, not a null-typed one.
RESULT_FIELDS: dict[str, pa.DataType] = {
    "label": pa.string(),
    "labels": pa.list_(pa.string()),  # a multi-label run's answer, in place of label
    "confidence": pa.float32(),
    "probs": pa.list_(pa.float32()),
    "truncated": pa.bool_(),
    "reasoning": pa.string(),  # vllm_prompt json mode only
    "ood_score": pa.float32(),  # abstain.score: distance only (hf)
    "error": pa.string(),
}
RESULT_COLUMNS = tuple(RESULT_FIELDS)
# Internal columns, dropped before writing: the input shard of a row, the output part it
# belongs to, how many rows that part must hold, whether the row's text had to be cleaned,
# and the dtype the back end's model ran in.
SHARD, PART, PART_ROWS, CLEANED, DTYPE = "_shard", "_part", "_part_rows", "_cleaned", "_dtype"
# Each row's share of the seconds the model spent on its chunk (backends.rows.stamp).
BUSY = "_busy_s"

# What a run writes beside its parts.
PART_SUFFIX = ".parquet"
MANIFEST = "_manifest.json"
METRICS = "_metrics.json"
REPORT = "report.md"
REPORT_HTML = "report.html"  # the same with plots (report_html.py)
CALIBRATION = "_calibration.json"  # `clsjob calibrate`: the temperature fitted on this run
PROGRESS = "_progress"  # one marker per finished shard
LOCK = "_lock.json"


def id_column(cfg: InputConfig) -> str:
    return cfg.id_column or DERIVED_ID


# A cascade's output column: the name of the stage whose label the row has (cascade.py).
LABELLED_BY = "labelled_by"


def result_columns(cfg: ClassifyConfig) -> list[str]:
    """The result columns this config writes: `reasoning` only where a back end gives one,
    `ood_score` only where abstention is by distance, `labelled_by` only from a cascade."""
    stages = cfg.stages()
    gone = set()
    if not any(stage.backend.writes_reasoning for stage in stages):
        gone.add("reasoning")
    if cfg.abstain is None or cfg.abstain.score != "distance":
        gone.add("ood_score")
    # The task's answer column (one label a row, or the list of those that apply); not the others'.
    gone |= {t.answer for t in TASKS.values()} - {Task.of(cfg.task).answer}
    columns = [c for c in RESULT_COLUMNS if c not in gone]
    return columns + [LABELLED_BY] if len(stages) > 1 else columns


def output_columns(cfg: ClassifyConfig) -> list[str]:
    inp = cfg.input
    cols = [id_column(inp), inp.text_column if cfg.output.keep_text else None,
            GOLD if inp.label_column else None, *inp.carry_columns, *result_columns(cfg)]
    return list(dict.fromkeys(c for c in cols if c))


def output_table(chunk: pa.Table, cfg: ClassifyConfig) -> pa.Table:
    """A labelled chunk as it is written: the output columns in order, result columns in their
    contract types (input columns keep the types they were read with)."""
    out = chunk.select(output_columns(cfg))
    schema = pa.schema([pa.field(f.name, RESULT_FIELDS.get(f.name, f.type)) for f in out.schema])
    return out.cast(schema)


def part_name(shard_key: str, start_row: int) -> str:
    """Stable for a given shard and row range, so a rerun writes the same names."""
    stem = shard_key.removesuffix(PART_SUFFIX)
    return f"{stem.replace('/', '__')}-{start_row:010d}{PART_SUFFIX}"


@dataclass(frozen=True)
class PartRecord:
    """What the writer knows of one written part: the shard marker lists it, the manifest
    lists it, and its counts add up to the run's metrics without re-reading the output."""
    shard: str
    part: str
    rows: int
    errored: int
    truncated: int
    cleaned: int
    dtype: str | None  # what the model ran in (None where a back end does not say)
    counts: Tally
    review: list = field(default_factory=list)  # the part's best rows to review (review.py)
    stages: dict | None = None  # a cascade's counts per stage (cascade.stage_counts)
    busy_s: float = 0.0  # the model's seconds on the part's rows (every stage's, in a cascade)

    @classmethod
    def of(cls, written: pa.Table, chunk: pa.Table, labels: LabelSet, task: Task,
           review: list | None = None, temperature: float | None = None,
           stages: dict | None = None) -> "PartRecord":
        """The record of `written` (output_table of `chunk`, one whole part), counted as
        `task` counts; `review`: its candidate rows for review; `temperature`: what its
        probabilities were scaled by; `stages`: a cascade's counts per stage."""
        errors = written.column("error").to_pylist()
        counts = task.count(labels, written, GOLD, temperature)
        return cls(shard=chunk.column(SHARD)[0].as_py(), part=chunk.column(PART)[0].as_py(),
                   rows=written.num_rows, errored=sum(e is not None for e in errors),
                   truncated=sum(bool(t) for t in written.column("truncated").to_pylist()),
                   cleaned=pc.sum(chunk.column(CLEANED)).as_py() or 0,
                   dtype=chunk.column(DTYPE)[0].as_py() if DTYPE in chunk.column_names else None,
                   counts=counts, review=review or [], stages=stages,
                   busy_s=(pc.sum(chunk.column(BUSY)).as_py() or 0.0) if BUSY in chunk.column_names else 0.0)

    def entry(self) -> dict:
        """The part as markers and the manifest list it."""
        return {"part": self.part, "rows": self.rows, "errored": self.errored,
                "truncated": self.truncated, "cleaned": self.cleaned, "dtype": self.dtype}

    # Between the write stage and the driver a record travels as one JSON string: as an Arrow
    # struct, the counts of many parts would be unified into one schema and grow null keys.
    def to_row(self) -> dict:
        return {"shard": self.shard, "record": json.dumps({**self.entry(), "review": self.review,
                                                           "stages": self.stages,
                                                           "busy_s": self.busy_s,
                                                           "counts": self.counts.to_json()})}

    @classmethod
    def from_row(cls, row: dict) -> "PartRecord":
        data = json.loads(row["record"])
        return cls(shard=row["shard"], counts=Tally.from_json(data.pop("counts")), **data)
