"""run_classify(cfg): Parquet shards in, labelled Parquet parts + manifest (+ metrics) out.

Read it top to bottom to follow one row: a shard is read in chunks of `output.rows_per_part`
rows (prepare: ids, errors), each chunk is labelled whole by one back-end actor, and written
whole as one part whose name comes from its shard and first row. Keeping a chunk whole from
read to write is what makes part names stable and rows out = rows in checkable per part.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import datetime, timezone
from functools import reduce

from clsjob import backends, model_cache, store
from clsjob.config import CASCADE, ClassifyConfig
from clsjob.contract import MANIFEST
from clsjob.evaluation.abstain import scored_labels, settle_rule
from clsjob.evaluation.monitor import distribution, drift_against_baseline, raise_on_alerts
from clsjob.evaluation.report import write_evaluation
from clsjob.evaluation.review import review_size, write_run_review
from clsjob.evaluation.tally import Tally
from clsjob.labels import LabelSet
from clsjob.run import resume
from clsjob.run.cascade import add_counts, cascade_summary
from clsjob.run.duplicates import check_duplicate_ids
from clsjob.run.lock import RunLock, RunLocked
from clsjob.run.placement import (StallReporter, alive_nodes, check_placement, classify_demand,
                                  ensure_ray, size_cpu_stages)
from clsjob.run.prepare import check_schema
from clsjob.run.stages import stream_labelled_parts
from clsjob.run.summary import (Progress, RunSummary, build_manifest, busy_summary, summary_of,
                                summary_table)
from clsjob.store import InputError
from clsjob.task import Task

log = logging.getLogger("clsjob")


def run_classify(cfg: ClassifyConfig, stage_work: list[float] | None = None) -> RunSummary:
    """The classify job. `stage_work`: for a cascade on CPU nodes whose stages set no
    resources, the CPU seconds a row is expected to bring each stage (placement.size_cpu_stages)."""
    started = datetime.now(timezone.utc)
    # Everything that can be wrong with the model, labels or schema fails here, before Ray
    # schedules anything and before a row is read.
    configured = LabelSet.from_specs(cfg.labels) if cfg.labels else None
    task = Task.of(cfg.task)  # what differs between one label a row and a set of them
    model = backends.check_stages(cfg.stages(), configured, cfg.storage, task)
    labels, temperature = model.labels, model.temperature
    stage_temperatures = model.stage_temperatures
    if cfg.abstain is not None:  # a threshold left out is the model folder's
        folder = getattr(cfg.backend, "model", None)  # the one stage's (a cascade has none)
        # score: distance reads an index beside config.json: is it there?
        files = (model_cache.model_config(folder, cfg.storage)[1]
                 if cfg.abstain.score == "distance" else [])
        cfg = cfg.model_copy(update={"abstain": settle_rule(cfg.abstain, model.config, folder, files)})
    shards, bad_files = usable_shards(cfg, task)
    # Everything below writes to the output folder: one run at a time.
    with RunLock(cfg.output.path, cfg.storage, cfg.output.stale_lock_after_s) as lock:
        return run_locked(cfg, task, labels, temperature, shards, bad_files, started, lock,
                          stage_temperatures, model.inputs, stage_work)


def run_locked(cfg: ClassifyConfig, task: Task, labels: LabelSet, temperature: float | None,
               shards: list[store.ShardInfo], bad_files: list[str], started: datetime,
               lock: RunLock, stage_temperatures: tuple = (), inputs: tuple = (),
               stage_work: list[float] | None = None) -> RunSummary:
    rows_in = sum(s.rows for s in shards)
    work = resume.work_hash(cfg, inputs)
    if cfg.output.overwrite:
        resume.clear(cfg.output.path, cfg.storage)
    finished = resume.finished_run(cfg, work)
    if finished:
        log.info("classify: %s already holds this finished run (%d rows); nothing to do "
                 "(--overwrite redoes it)", cfg.output.path, finished["rows_out"])
        raise_on_alerts(finished.get("drift"), cfg.output.path)  # a retry must not hide it
        return summary_of(finished, cfg)
    done = resume.load_done(cfg, work, shards)
    todo = [s for s in shards if s.key not in done]
    ensure_ray(*stage_demands(cfg))
    cfg = size_cpu_stages(cfg, alive_nodes(), stage_work)  # a CPU cascade's stages given no resources
    demands = stage_demands(cfg)
    check_placement(demands, cfg.cluster.autoscaling)  # a cascade's pools share the nodes
    duplicates = check_duplicate_ids(cfg, shards)
    log.info("classify: %d rows in %d shards -> %s (%d shards already done)",
             rows_in, len(shards), cfg.output.path, len(done))

    progress = Progress(sum(s.rows for s in todo))
    # The classes scored: the model's labels, and abstain.label when rows may get it.
    scored = scored_labels(labels, cfg.abstain)
    review_rows = review_size(cfg.output.review, rows_in) if cfg.output.review else 0
    shard_progress = resume.ShardProgress(cfg, work, todo, task, len(scored), review_rows)
    busy_s = 0.0  # the model's seconds on this attempt's rows
    with StallReporter(demands[-1], "classify", cfg.cluster.stall_report_s) as stall:
        for record in stream_labelled_parts(cfg, task, labels, todo, review_rows, temperature):  # as parts land
            stall.beat()
            shard_progress.add(record)
            progress.update(record.rows)
            busy_s += record.busy_s
    elapsed = time.monotonic() - progress.started

    # Every shard, done now or by an earlier attempt, is accounted for by its marker.
    markers = {**done, **shard_progress.markers}
    parts = [p for m in markers.values() for p in m["parts"]]
    total = task.tally(len(scored))
    for marker in markers.values():
        total.add(Tally.from_json(marker["tally"]))
    rows_out = sum(p["rows"] for p in parts)
    summary = RunSummary(cfg.output.path, rows_in, rows_out, sum(p["errored"] for p in parts),
                         round(elapsed, 3), round(progress.done / elapsed, 2) if elapsed else 0.0, None)
    if lock.lost:
        raise RunLocked(f"another run took {cfg.output.path} over during this one; "
                        f"its manifest is left to that run")
    complete = rows_out == rows_in and len(markers) == len(shards)
    # Rows for review: every shard's best rows are in its marker, so nothing is re-read.
    review = (write_run_review(cfg.output.review, list(markers.values()), review_rows,
                               cfg.output.path, cfg.storage)
              if cfg.output.review and complete else None)
    # The run's label distribution (every labelled row), and its drift against the baseline.
    dist = distribution(scored, total, task)
    drift = drift_against_baseline(dist, cfg.monitor, cfg.storage) if complete else None
    manifest = build_manifest(cfg, work, labels, temperature, review, shards, bad_files,
                              duplicates, set(markers), parts, summary, started, complete)
    # With more than one stage: each stage's rows, speed and accuracy.
    cascade = cascade_summary(cfg, reduce(add_counts, (m.get("stages") or {} for m in markers.values()), {}),
                              list(stage_temperatures))
    store.write_json({**manifest, "distribution": dist, "drift": drift, CASCADE: cascade,
                      "busy": busy_summary(busy_s, elapsed, cfg)},
                     store.join(cfg.output.path, MANIFEST), cfg.storage)
    if not complete:
        raise RuntimeError(f"rows out ({rows_out}) != rows in ({rows_in}) or shards unfinished; "
                           f"see {MANIFEST}; a rerun resumes")
    if cfg.input.label_column:
        metrics = write_evaluation(cfg.output.path, cfg.storage, scored, total, task, summary.rows_per_s,
                                   cfg.evaluate.target_accuracy, drift, cascade)
        summary = replace(summary, metrics=metrics)
    log.info("classify: done\n%s", summary_table(summary, len(shards), len(bad_files)))
    raise_on_alerts(drift, cfg.output.path)  # last: a scheduler alerts, nothing is lost
    return summary


def stage_demands(cfg: ClassifyConfig) -> list:
    """What each stage's actor pool asks of the cluster, named by its config key."""
    return [classify_demand(stage.resources, f"{stage.key}resources") for stage in cfg.stages()]


def usable_shards(cfg: ClassifyConfig, task: Task) -> tuple[list[store.ShardInfo], list[str]]:
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
        check_schema(shard, cfg.input, task)
    return shards, bad
