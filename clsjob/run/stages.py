"""The Ray Data graph of a classify run and its stages: read (a task per shard, chunks of
`output.rows_per_part` rows, prepared, handed on `output.parts_per_call` chunks a block),
classify (the back end's actor pool, one block per call) and write (a task per block: one
part per chunk, and its PartRecord with the metric counts). Chunks stay whole from read to
write: part names are stable, and rows out = rows in is checked per part."""
from __future__ import annotations

import warnings
from typing import Iterator

import pyarrow as pa
import ray

from clsjob import store
from clsjob.config import ClassifyConfig, InputConfig, StorageConfig
from clsjob.contract import GOLD, PART, PART_ROWS, PartRecord, id_column, output_table
from clsjob.evaluation.abstain import apply_abstention, scored_labels
from clsjob.evaluation.review import part_candidates
from clsjob.labels import LabelSet
from clsjob.run.cascade import part_stage_counts, stage_actors
from clsjob.run.placement import actor_placement
from clsjob.run.prepare import needed_columns, prepare_chunk
from clsjob.task import Task


def stream_labelled_parts(cfg: ClassifyConfig, task: Task, labels: LabelSet,
                          shards: list[store.ShardInfo], review_rows: int = 0,
                          temperature: float | None = None) -> Iterator[PartRecord]:
    """The Ray Data pipeline: read + prepare (tasks) -> classify (actor pool) -> write (tasks).
    Yields a PartRecord as each part lands (with its best `review_rows` rows for review)."""
    if not any(s.rows for s in shards):
        return
    ds = ray.data.from_items([{"path": s.path, "key": s.key} for s in shards],
                             override_num_blocks=len(shards))
    # Chunks must reach the writer whole (one chunk = one part): this job's blocks are never
    # split by size. The dataset holds its own copy of the context, which every stage built
    # from it below shares, so the process's other datasets keep Ray's default.
    ds.context.target_max_block_size = None
    ds = ds.map_batches(read_chunks, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"input_cfg": cfg.input, "chunk_rows": cfg.output.rows_per_part,
                                   "parts_per_call": cfg.parts_per_call(), "storage": cfg.storage,
                                   "task": task})
    # One actor pool per stage: the one back end, or each stage of a cascade (cascade.py).
    for stage, actor, kwargs in stage_actors(cfg, labels):
        with warnings.catch_warnings():
            # Ray 2.60 calls ray_remote_args_fn deprecated (for removal in 2.64), yet it is how
            # ray.data.llm places its own GPU actors; placement.actor_placement says why.
            warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*deprecated")
            ds = ds.map_batches(actor, batch_size=None, batch_format="pyarrow",
                                fn_constructor_kwargs=kwargs, compute=actor_pool(stage.resources),
                                **actor_placement(stage.backend, stage.resources))
    ds = ds.map_batches(write_parts, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"cfg": cfg, "task": task, "labels": scored_labels(labels, cfg.abstain),
                                   "review_rows": review_rows, "temperature": temperature})
    for row in ds.iter_rows():
        yield PartRecord.from_row(row)


def actor_pool(resources) -> ray.data.ActorPoolStrategy:
    least, most = resources.actor_range()
    # Several calls at once in one actor, truly in parallel threads: the back ends serialise
    # the model themselves (a lock, or vllm_engine.EngineFeed) and leave reading, tokenising
    # and Arrow work outside it, where it overlaps the model's.
    calls = {"max_concurrent_calls_per_actor": resources.calls_per_actor,
             "enable_true_multi_threading": resources.calls_per_actor > 1}
    if least == most:
        return ray.data.ActorPoolStrategy(size=least, **calls)
    return ray.data.ActorPoolStrategy(min_size=least, max_size=most, **calls)


def read_chunks(batch: pa.Table, input_cfg: InputConfig, chunk_rows: int, parts_per_call: int,
                storage: StorageConfig, task: Task) -> Iterator[pa.Table]:
    """Read stage (Ray task): one shard -> prepared chunks of `chunk_rows` rows, each with its
    own part name, yielded `parts_per_call` at a time as one block (the last may hold fewer):
    a block is what one back-end call gets, so hf sorts its rows by length together."""
    for path, key in zip(batch.column("path").to_pylist(), batch.column("key").to_pylist()):
        block = []
        for start, table in store.iter_shard(path, needed_columns(input_cfg), chunk_rows, storage):
            block.append(prepare_chunk(table, key, start, input_cfg, task))
            if len(block) == parts_per_call:
                yield pa.concat_tables(block)
                block = []
        if block:
            yield pa.concat_tables(block)


def write_parts(table: pa.Table, cfg: ClassifyConfig, task: Task, labels: LabelSet,
                review_rows: int = 0, temperature: float | None = None) -> pa.Table:
    """Write stage (Ray task): each labelled chunk of the block becomes one part, rows under the
    abstention threshold relabelled; returns one PartRecord row per part (counted over
    `labels`, the classes scored), so the driver never re-reads the output to evaluate it."""
    records = []
    for name in sorted(set(table.column(PART).to_pylist())):
        chunk = table.filter(pa.compute.equal(table.column(PART), name))
        expected = chunk.column(PART_ROWS)[0].as_py()
        if chunk.num_rows != expected:
            # Guard for the invariant above: a split chunk would write a short part and lose rows.
            raise RuntimeError(f"part {name}: got {chunk.num_rows} of {expected} rows in one batch")
        written = apply_abstention(output_table(chunk, cfg), cfg.abstain)
        store.write_part(written, store.join(cfg.output.path, name), cfg.storage)
        review = (part_candidates(written, chunk.column(cfg.input.text_column).to_pylist(),
                                  id_column(cfg.input), GOLD if cfg.input.label_column else None,
                                  cfg.output.review, review_rows, task) if cfg.output.review else [])
        stages = part_stage_counts(cfg, chunk, written,
                                   written.column(GOLD).to_pylist() if cfg.input.label_column else None,
                                   labels)
        records.append(PartRecord.of(written, chunk, labels, task, review, temperature, stages).to_row())
    return pa.Table.from_pylist(records)
