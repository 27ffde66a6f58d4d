"""run_classify(cfg): Parquet shards in, labelled Parquet parts + manifest (+ metrics) out.

Read it top to bottom to follow one row: a shard is read in chunks of `resources.batch_size`
rows (prepare: ids, errors), each chunk is labelled whole by one back-end actor, and written
whole as one part whose name comes from its shard and first row. Keeping a chunk whole from
read to write is what makes part names stable and rows out = rows in checkable per part.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Iterator

import pyarrow as pa
import ray

from clsjob import backends, resume, store
from clsjob.config import ClassifyConfig, InputConfig, StorageConfig, config_hash
from clsjob.duplicates import DuplicateIds, check_duplicate_ids
from clsjob.store import InputError
from clsjob.labels import LabelSet
from clsjob.lock import RunLock, RunLocked
from clsjob.metrics import Tally, count_rows
from clsjob.placement import StallReporter, check_placement, classify_demand, ensure_ray
from clsjob.prepare import (CLEANED, GOLD, PART, PART_ROWS, SHARD, check_schema, id_column,
                            needed_columns, prepare_chunk)
from clsjob.report import write_evaluation

log = logging.getLogger("clsjob")
MANIFEST = resume.MANIFEST


@dataclass(frozen=True)
class RunSummary:
    output: str
    rows_in: int
    rows_out: int
    rows_errored: int
    elapsed_s: float
    rows_per_s: float
    metrics: dict | None


def run_classify(cfg: ClassifyConfig) -> RunSummary:
    started = datetime.now(timezone.utc)
    # Everything that can be wrong with the model, labels or schema fails here, before Ray
    # schedules anything and before a row is read.
    configured = LabelSet.from_specs(cfg.labels) if cfg.labels else None
    labels = backends.check_model_and_labels(cfg.backend, configured, cfg.storage)
    shards, bad_files = usable_shards(cfg)
    # Everything below writes to the output folder: one run at a time.
    with RunLock(cfg.output.path, cfg.storage, cfg.output.stale_lock_after_s) as lock:
        return run_locked(cfg, labels, shards, bad_files, started, lock)


def run_locked(cfg: ClassifyConfig, labels: LabelSet, shards: list[store.ShardInfo],
               bad_files: list[str], started: datetime, lock: RunLock) -> RunSummary:
    rows_in = sum(s.rows for s in shards)
    work = resume.work_hash(cfg)
    if cfg.output.overwrite:
        resume.clear(cfg.output.path, cfg.storage)
    finished = resume.finished_run(cfg, work)
    if finished:
        log.info("classify: %s already holds this finished run (%d rows); nothing to do "
                 "(--overwrite redoes it)", cfg.output.path, finished["rows_out"])
        return summary_of(finished, cfg)
    done = resume.load_done(cfg, work, shards)
    todo = [s for s in shards if s.key not in done]
    demand = classify_demand(cfg.resources)
    ensure_ray(demand)
    check_placement(demand, cfg.cluster.autoscaling)
    duplicates = check_duplicate_ids(cfg, shards)
    log.info("classify: %d rows in %d shards -> %s (%d shards already done)",
             rows_in, len(shards), cfg.output.path, len(done))

    progress = Progress(sum(s.rows for s in todo))
    shard_progress = resume.ShardProgress(cfg, work, todo, len(labels))
    with StallReporter(demand, "classify", cfg.cluster.stall_report_s) as stall:
        for stats in stream_labelled_parts(cfg, labels, todo):  # one small row per part, streamed
            stall.beat()
            shard_progress.add(stats)
            progress.update(stats["rows"])
    elapsed = time.monotonic() - progress.started

    # Every shard, done now or by an earlier attempt, is accounted for by its marker.
    markers = {**done, **shard_progress.markers}
    parts = [p for m in markers.values() for p in m["parts"]]
    total = Tally(n_labels=len(labels))
    for marker in markers.values():
        total.add(Tally.from_json(marker["tally"]))
    rows_out = sum(p["rows"] for p in parts)
    summary = RunSummary(cfg.output.path, rows_in, rows_out, sum(p["errored"] for p in parts),
                         round(elapsed, 3), round(progress.done / elapsed, 2) if elapsed else 0.0, None)
    if lock.lost:
        raise RunLocked(f"another run took {cfg.output.path} over during this one; "
                        f"its manifest is left to that run")
    complete = rows_out == rows_in and len(markers) == len(shards)
    store.write_json(manifest(cfg, work, labels, shards, bad_files, duplicates, set(markers), parts,
                           summary, started, complete),
                  store.join(cfg.output.path, MANIFEST), cfg.storage)
    if not complete:
        raise RuntimeError(f"rows out ({rows_out}) != rows in ({rows_in}) or shards unfinished; "
                           f"see {MANIFEST}; a rerun resumes")
    if cfg.input.label_column:
        metrics = write_evaluation(cfg.output.path, cfg.storage, labels, total, summary.rows_per_s)
        summary = replace(summary, metrics=metrics)
    log.info("classify: done\n%s", summary_table(summary, len(shards), len(bad_files)))
    return summary


def usable_shards(cfg: ClassifyConfig) -> tuple[list[store.ShardInfo], list[str]]:
    """Shards whose footer reads and whose schema serves the config; unreadable files fail
    the run or are skipped (and reported) as `input.on_bad_file` says."""
    shards = store.inspect_shards(store.list_shards(cfg.input.path, cfg.storage), cfg.storage)
    bad = [s.error for s in shards if s.error]
    if bad and cfg.input.on_bad_file == "fail":
        raise InputError(f"{bad[0]} (input.on_bad_file: skip would skip it; "
                         f"{len(bad)} unreadable file(s) in all)")
    for error in bad:
        log.warning("classify: skipping %s", error)
    shards = [s for s in shards if not s.error]
    for shard in shards:
        check_schema(shard, cfg.input)
    return shards, bad


def summary_table(summary: RunSummary, shards: int, skipped: int) -> str:
    rows = [("rows in", summary.rows_in), ("rows out", summary.rows_out),
            ("labelled", summary.rows_out - summary.rows_errored),
            ("errored", summary.rows_errored), ("shards", shards), ("files skipped", skipped),
            ("rows/s (this attempt)", summary.rows_per_s), ("output", summary.output)]
    if summary.metrics:
        rows.insert(4, ("accuracy", round(summary.metrics["accuracy"], 4)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def stream_labelled_parts(cfg: ClassifyConfig, labels: LabelSet, shards: list[store.ShardInfo]) -> Iterator[dict]:
    """The Ray Data pipeline: read + prepare (tasks) -> classify (actor pool) -> write (tasks).
    Yields the write stage's stats rows as parts land."""
    if not any(s.rows for s in shards):
        return
    ds = ray.data.from_items([{"path": s.path, "key": s.key} for s in shards],
                             override_num_blocks=len(shards))
    # Chunks must reach the writer whole (one chunk = one part): this job's blocks are never
    # split by size. The dataset holds its own copy of the context, which every stage built
    # from it below shares, so the process's other datasets keep Ray's default.
    ds.context.target_max_block_size = None
    ds = ds.map_batches(read_chunks, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"input_cfg": cfg.input, "chunk_rows": cfg.resources.batch_size,
                                   "storage": cfg.storage})
    ds = ds.map_batches(
        backends.actor_class(cfg.backend), batch_size=None, batch_format="pyarrow",
        fn_constructor_kwargs=backends.actor_kwargs(cfg, labels),
        compute=ray.data.ActorPoolStrategy(size=cfg.resources.actors),
        num_gpus=cfg.resources.gpus_per_actor,
        num_cpus=cfg.resources.cpus_per_actor)
    ds = ds.map_batches(write_parts, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"cfg": cfg, "labels": labels})
    yield from ds.iter_rows()


def read_chunks(batch: pa.Table, input_cfg: InputConfig, chunk_rows: int,
                storage: StorageConfig) -> Iterator[pa.Table]:
    """Read stage (Ray task): one shard -> prepared chunks of `chunk_rows` rows."""
    for path, key in zip(batch.column("path").to_pylist(), batch.column("key").to_pylist()):
        for start, table in store.iter_shard(path, needed_columns(input_cfg), chunk_rows, storage):
            yield prepare_chunk(table, key, start, input_cfg)


def output_columns(cfg: ClassifyConfig) -> list[str]:
    inp = cfg.input
    cols = [id_column(inp), inp.text_column if cfg.output.keep_text else None,
            GOLD if inp.label_column else None,
            *inp.carry_columns, "label", "confidence", "probs", "truncated",
            "reasoning" if cfg.backend.kind == "vllm_prompt" and cfg.backend.prompt.mode == "json"
            else None, "error"]
    return list(dict.fromkeys(c for c in cols if c))


def write_parts(table: pa.Table, cfg: ClassifyConfig, labels: LabelSet) -> pa.Table:
    """Write stage (Ray task): each labelled chunk becomes one part; returns one stats row per
    part, with the metric counts so the driver never re-reads the output to evaluate it."""
    stats = []
    for name in sorted(set(table.column(PART).to_pylist())):
        rows = table.filter(pa.compute.equal(table.column(PART), name))
        expected = rows.column(PART_ROWS)[0].as_py()
        if rows.num_rows != expected:
            # Guard for the invariant above: a split chunk would write a short part and lose rows.
            raise RuntimeError(f"part {name}: got {rows.num_rows} of {expected} rows in one batch")
        out = rows.select(output_columns(cfg))
        store.write_part(out, store.join(cfg.output.path, name), cfg.storage)
        errors = out.column("error").to_pylist()
        gold = (out.column(GOLD).to_pylist() if cfg.input.label_column
                else [None] * out.num_rows)
        counts = count_rows(labels, gold, out.column("label").to_pylist(),
                       out.column("confidence").to_pylist(), errors)
        stats.append({"shard": rows.column(SHARD)[0].as_py(), "part": name, "rows": out.num_rows,
                      "errored": sum(e is not None for e in errors),
                      "truncated": sum(bool(t) for t in out.column("truncated").to_pylist()),
                      "cleaned": pa.compute.sum(rows.column(CLEANED)).as_py() or 0,
                      # A JSON string: as an Arrow struct, per-row dicts would be unified into
                      # one schema and grow null keys.
                      "tally": json.dumps(counts.to_json())})
    return pa.Table.from_pylist(stats)


class Progress:
    """A log line at most every `every_s` seconds: rows done of total, rows/s, time left."""

    def __init__(self, total: int, every_s: float = 10.0):
        self.total, self.every_s, self.done = total, every_s, 0
        self.started = self.last = time.monotonic()

    def update(self, rows: int) -> None:
        self.done += rows
        done, now = self.done, time.monotonic()
        if done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        left = (self.total - done) / rate if rate else float("inf")
        log.info("classify: %d/%d rows (%.1f%%), %.1f rows/s, ~%.0f s left",
                 done, self.total, 100 * done / max(self.total, 1), rate, left)


def manifest(cfg: ClassifyConfig, work: str, labels: LabelSet, shards: list[store.ShardInfo],
             bad_files: list[str], duplicates: DuplicateIds | None, done: set[str],
             parts: list[dict], summary: RunSummary, started: datetime, complete: bool) -> dict:
    return {
        "status": "complete" if complete else "incomplete",
        "run_id": uuid.uuid4().hex,
        "config_hash": config_hash(cfg),
        "work_hash": work,
        "backend": cfg.backend.kind,
        "model": cfg.backend.model,
        "labels": list(labels.names),
        "id_column": id_column(cfg.input),
        "text_column": cfg.input.text_column,
        "gold_column": GOLD if cfg.input.label_column else None,
        "rows_in": summary.rows_in,
        "rows_out": summary.rows_out,
        "rows_errored": summary.rows_errored,
        "rows_truncated": sum(p["truncated"] for p in parts),
        # Rows whose text had invalid UTF-8 or control characters, cleaned before classifying.
        "rows_cleaned": sum(p["cleaned"] for p in parts),
        "rows_per_s": summary.rows_per_s,  # of the rows labelled by this attempt
        "elapsed_s": summary.elapsed_s,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "shards": [{"path": s.path, "key": s.key, "rows": s.rows, "done": s.key in done}
                   for s in shards],
        "skipped_files": bad_files,
        # Repeated values of input.id_column (null when ids are derived, so unique).
        "duplicate_ids": duplicates.to_json() if duplicates else None,
        "parts": sorted(parts, key=lambda p: p["part"]),
    }


def summary_of(manifest: dict, cfg: ClassifyConfig) -> RunSummary:
    """The summary of a finished run, read back instead of redone."""
    metrics_url = store.join(cfg.output.path, "_metrics.json")
    metrics = store.read_json(metrics_url, cfg.storage) if store.exists(metrics_url, cfg.storage) else None
    return RunSummary(cfg.output.path, manifest["rows_in"], manifest["rows_out"],
                      manifest["rows_errored"], 0.0, 0.0, metrics)
