"""What a classify run reports: its summary, progress lines while it runs, the manifest
written last, and the closing table."""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from clsjob import store
from clsjob.config import ClassifyConfig, config_hash
from clsjob.contract import GOLD, METRICS, id_column
from clsjob.labels import LabelSet
from clsjob.run.duplicates import DuplicateIds
from clsjob.task import Task

log = logging.getLogger("clsjob")


@dataclass(frozen=True)
class RunSummary:
    output: str
    rows_in: int
    rows_out: int
    rows_errored: int
    elapsed_s: float
    rows_per_s: float
    metrics: dict | None


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


def busy_summary(busy_s: float, elapsed_s: float, cfg: ClassifyConfig) -> dict:
    """How much of this attempt the model spent computing: its seconds on the rows, and their
    share of the actors' time (the largest pool, from the first row read to the last part
    written, actor start-up included). A share well under 1 on a long run says the model
    waited: for reads, tokenising, or chunks (resources.calls_per_actor, rows_per_part)."""
    stages = cfg.stages()
    actors = sum(stage.resources.actor_range()[1] for stage in stages)
    return {"model_s": round(busy_s, 3),
            "share": round(busy_s / (elapsed_s * actors), 4) if elapsed_s > 0 else None,
            # What those seconds ran on: model_s x this is the CPU time a later run on fewer or
            # more CPUs can be sized from (distill's cascade). A cascade's stages: in CASCADE.
            "cpus_per_actor": stages[0].resources.cpus_per_actor if len(stages) == 1 else None}


def build_manifest(cfg: ClassifyConfig, work: str, labels: LabelSet, temperature: float | None,
                   review: dict | None, shards: list[store.ShardInfo], bad_files: list[str],
                   duplicates: DuplicateIds | None, done: set[str], parts: list[dict],
                   summary: RunSummary, started: datetime, complete: bool) -> dict:
    models = [stage.backend.model for stage in cfg.stages()]
    return {
        "status": "complete" if complete else "incomplete",
        "run_id": uuid.uuid4().hex,
        "config_hash": config_hash(cfg),
        "work_hash": work,
        "backend": cfg.backend.kind,
        "task": cfg.task,  # task.py: its answer column (`label`, or a `labels` list)
        "model": models[0] if len(models) == 1 else models,  # a cascade: each stage's
        # What the model ran in (backend.dtype: auto chooses per node); more than one only on
        # a cluster whose nodes differ. Each part's own is in `parts`.
        "dtypes": sorted({p["dtype"] for p in parts if p.get("dtype")}),
        # What the probabilities were scaled by: softmax(logits / T) (calibration.py); 1 =
        # uncalibrated, null = the back end gives no probabilities.
        "temperature": temperature,
        # Rows under abstain.below got abstain.label (or an error); the metrics score that
        # label as one more class after `labels`.
        "abstain": cfg.abstain.model_dump() if cfg.abstain else None,
        # output.review: where the rows for review are, how many, and how they were picked.
        "review": review,
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


def summary_table(summary: RunSummary, shards: int, skipped: int) -> str:
    rows = [("rows in", summary.rows_in), ("rows out", summary.rows_out),
            ("labelled", summary.rows_out - summary.rows_errored),
            ("errored", summary.rows_errored), ("shards", shards), ("files skipped", skipped),
            ("rows/s (this attempt)", summary.rows_per_s), ("output", summary.output)]
    if summary.metrics:
        # The headline of each task: accuracy, or macro- and micro-F1 over the labels.
        keys = Task.of_metrics(summary.metrics).summary_keys
        for key in reversed(keys):
            value = summary.metrics[key]
            rows.insert(4, (key.replace("_", " "), "none (no row could be scored)" if value is None
                            else round(value, 4)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def summary_of(manifest: dict, cfg: ClassifyConfig) -> RunSummary:
    """The summary of a finished run, read back instead of redone."""
    metrics_url = store.join(cfg.output.path, METRICS)
    metrics = store.read_json(metrics_url, cfg.storage) if store.exists(metrics_url, cfg.storage) else None
    return RunSummary(cfg.output.path, manifest["rows_in"], manifest["rows_out"],
                      manifest["rows_errored"], 0.0, 0.0, metrics)
