"""The Ray Data graph of a classify run and its stages: read (a task per shard, chunks of
`resources.batch_size` rows, prepared), classify (the back end's actor pool, one whole chunk
per call) and write (a task per chunk: one part, and a small stats row with its metric
counts). Chunks stay whole from read to write: part names are stable, and rows out = rows in
is checked per part."""
from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa
import ray

from clsjob import backends, store
from clsjob.config import ClassifyConfig, InputConfig, StorageConfig
from clsjob.labels import LabelSet
from clsjob.metrics import count_rows
from clsjob.prepare import (CLEANED, GOLD, PART, PART_ROWS, SHARD, id_column, needed_columns,
                            prepare_chunk)


def stream_labelled_parts(cfg: ClassifyConfig, labels: LabelSet,
                          shards: list[store.ShardInfo]) -> Iterator[dict]:
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
