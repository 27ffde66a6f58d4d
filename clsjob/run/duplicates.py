"""Duplicate ids in the input, found before any row is labelled.

One distributed pass over the id column alone: a Ray Data hash shuffle groups the ids, so no
process ever holds all of them, and a billion-row input costs a read of one column. Derived
ids ('<shard>:<row>') are unique by construction and are not checked.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import ray

from clsjob import store
from clsjob.config import ClassifyConfig, StorageConfig
from clsjob.store import InputError

log = logging.getLogger("clsjob")
COUNT = "count()"  # the column Ray Data's groupby().count() names
EXAMPLES = 10


@dataclass(frozen=True)
class DuplicateIds:
    ids: int  # distinct ids that occur more than once
    rows: int  # rows that carry one of them
    examples: list[dict]  # a few of them with their counts, for the log and the manifest

    def to_json(self) -> dict:
        return {"ids": self.ids, "rows": self.rows, "examples": self.examples}


def check_duplicate_ids(cfg: ClassifyConfig, shards: list[store.ShardInfo]) -> DuplicateIds | None:
    """Find repeated values of `input.id_column`; fail or report as `input.on_duplicate_ids`
    says. None when ids are derived."""
    column = cfg.input.id_column
    if not column or not any(s.rows for s in shards):
        return None
    found = find_duplicate_ids([s.path for s in shards if s.rows], column, cfg.storage,
                               rows=sum(s.rows for s in shards))
    if found.ids:
        shown = ", ".join(f"{e['id']!r} ×{e['rows']}" for e in found.examples)
        message = (f"input.id_column {column!r}: {found.ids} ids occur more than once, "
                   f"on {found.rows} rows (e.g. {shown})")
        if cfg.input.on_duplicate_ids == "fail":
            raise InputError(f"{message}; set input.on_duplicate_ids: report to label them anyway")
        log.warning("classify: %s; every row is still labelled, and the manifest lists them", message)
    return found


def find_duplicate_ids(paths: list[str], column: str, storage: StorageConfig,
                       rows: int) -> DuplicateIds:
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    ds = ds.map_batches(read_ids, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"column": column, "storage": storage})
    # One shuffle partition per ~2M ids: Ray's default (200) suits big clusters, and each
    # partition costs an aggregator, which dominates on a small input.
    partitions = max(1, min(200, rows // 2_000_000))
    repeated = (ds.groupby("id", num_partitions=partitions).count()
                .map_batches(lambda t: t.filter(pc.greater(t[COUNT], 1)), batch_format="pyarrow")
                .materialize())  # stays in the object store; only counts and a few rows come back
    ids = repeated.count()
    if not ids:
        return DuplicateIds(0, 0, [])
    rows = repeated.sum(COUNT)
    examples = [{"id": str(r["id"]), "rows": r[COUNT]}
                for r in repeated.sort(COUNT, descending=True).take(EXAMPLES)]
    return DuplicateIds(ids, rows, examples)


def read_ids(batch: pa.Table, column: str, storage: StorageConfig) -> Iterator[pa.Table]:
    for path in batch.column("path").to_pylist():
        for _, table in store.iter_shard(path, [column], 1 << 20, storage):
            yield pa.table({"id": table.column(column)})
