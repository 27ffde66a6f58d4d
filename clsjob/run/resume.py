"""Resume and idempotence: which input shards a run has finished, one marker per shard.

A shard's marker is written (atomically) only after every part of that shard is written; it
carries the shard's parts and metric counts. A rerun with the same config skips marked shards
entirely and still reports over all rows. A shard without a marker is redone from its first
row: its parts get the same names, so the redo replaces them and no row appears twice.
"""
from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor

from clsjob import store
from clsjob.config import ClassifyConfig
from clsjob.contract import (CALIBRATION, MANIFEST, METRICS, PROGRESS, REPORT, REPORT_HTML,
                             PartRecord)
from clsjob.evaluation.review import REVIEW, best
from clsjob.run.cascade import add_counts
from clsjob.task import Task

log = logging.getLogger("clsjob")


class OutputConflict(ValueError):
    """The output folder holds the work of a different config."""


def work_hash(cfg: ClassifyConfig, inputs: tuple = ()) -> str:
    """What decides the rows written: the whole config except how many actors, GPUs, CPUs
    and calls at once do the work, how many parts share a call, how the cluster behaves,
    where models are cached, how the rows are evaluated or monitored, and the overwrite switch.
    `inputs`: (setting, fingerprint) of files the config names whose content decides the
    rows (backends.CheckedModel.inputs). Two runs with the same hash write the same parts."""
    data = cfg.model_dump(mode="json", exclude={
        "resources": {"actors", "gpus_per_actor", "cpus_per_actor", "calls_per_actor"}, "cluster": True,
        "output": {"overwrite", "stale_lock_after_s", "parts_per_call"}, "storage": {"model_cache"},
        "evaluate": True, "monitor": True})
    for stage in data["backend"].get("stages") or ():  # a cascade's actor pools, likewise
        stage.pop("resources", None)
    if inputs:  # left out when there are none, so earlier runs' hashes stay as they were
        data["inputs"] = [list(item) for item in inputs]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def marker_url(output: str, shard_key: str) -> str:
    return store.join(output, PROGRESS, hashlib.sha1(shard_key.encode()).hexdigest()[:20] + ".json")


def clear(output: str, storage) -> None:
    """--overwrite: forget a previous run, parts included."""
    for part in store.list_parts(output, storage):
        store.remove(part, storage)
    for name in (PROGRESS, MANIFEST, METRICS, REPORT, REPORT_HTML, CALIBRATION, REVIEW):
        store.remove(store.join(output, name), storage)


def finished_run(cfg: ClassifyConfig, work: str) -> dict | None:
    """The manifest of a complete earlier run of this same work, if there is one."""
    url = store.join(cfg.output.path, MANIFEST)
    if not store.exists(url, cfg.storage):
        return None
    manifest = store.read_json(url, cfg.storage)
    if manifest.get("work_hash") != work:
        raise OutputConflict(
            f"output.path {cfg.output.path} holds a finished run of another config "
            f"(work hash {manifest.get('work_hash')}, this one {work}); "
            f"use --overwrite to replace it, or another output.path")
    return manifest if manifest.get("status") == "complete" else None


def load_done(cfg: ClassifyConfig, work: str, shards: list[store.ShardInfo]) -> dict[str, dict]:
    """Markers of shards already finished by an earlier attempt of this work, by shard key."""
    urls = store.list_files(store.join(cfg.output.path, PROGRESS), ".json", cfg.storage)
    with ThreadPoolExecutor(max_workers=16) as pool:
        markers = list(pool.map(lambda u: store.read_json(u, cfg.storage), urls))
    other = {m["work_hash"] for m in markers} - {work}
    if other:
        raise OutputConflict(
            f"output.path {cfg.output.path} holds unfinished work of another config "
            f"(work hash {sorted(other)}, this one {work}); use --overwrite or another output.path")
    rows = {s.key: s.rows for s in shards}
    # A shard whose row count changed since is not done: it is redone in full.
    return {m["shard"]: m for m in markers if rows.get(m["shard"]) == m["rows"]}


class ShardProgress:
    """Collects the written parts' records per shard; marks a shard done when all its rows
    are written."""

    def __init__(self, cfg: ClassifyConfig, work: str, shards: list[store.ShardInfo], task: Task,
                 n_labels: int, review_rows: int = 0):
        self.cfg, self.work, self.n_labels, self.review_rows = cfg, work, n_labels, review_rows
        self.review: dict[str, list[dict]] = {s.key: [] for s in shards}
        self.rows = {s.key: s.rows for s in shards}
        self.parts: dict[str, list[dict]] = {s.key: [] for s in shards}
        self.tallies = {s.key: task.tally(n_labels) for s in shards}
        self.stages: dict[str, dict] = {s.key: {} for s in shards}  # a cascade's, per shard
        self.markers: dict[str, dict] = {}  # shards finished by this attempt, by key
        for shard in shards:
            if shard.rows == 0:  # nothing to read, so no stats row will ever finish it
                self._mark(shard.key)

    def add(self, record: PartRecord) -> None:
        key = record.shard
        self.parts[key].append(record.entry())
        self.tallies[key].add(record.counts)
        if record.stages:
            self.stages[key] = add_counts(self.stages[key], record.stages)
        if record.review:  # the shard's best rows so far: bounded, whatever the shard's size
            self.review[key] = best([*self.review[key], *record.review], self.review_rows,
                                    self.cfg.output.review.per_label)
        if sum(p["rows"] for p in self.parts[key]) == self.rows[key]:
            self._mark(key)

    def _mark(self, key: str) -> None:
        marker = {"shard": key, "rows": self.rows[key], "work_hash": self.work,
                  "parts": sorted(self.parts[key], key=lambda p: p["part"]),
                  "tally": self.tallies[key].to_json(), "review": self.review[key],
                  "stages": self.stages[key]}
        store.write_json(marker, marker_url(self.cfg.output.path, key), self.cfg.storage)
        self.markers[key] = marker
