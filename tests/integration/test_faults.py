"""Faults during a run: a classifier actor's process killed mid-run; Ray restarts the actor,
Ray Data retries its work, and the run still completes with every row exactly once."""
import time

import pyarrow as pa
import pyarrow.parquet as pq
import psutil

from clsjob.config import ClassifyConfig, validate
from clsjob.run.pipeline import run_classify
from helpers import KillOnceAtWork, cluster_processes, sample_texts, write_shards

SHARDS, ROWS = 6, 200


def classifier_processes() -> list[psutil.Process]:
    return cluster_processes("HFClassifier")


def test_killed_actor_does_not_lose_or_double_rows(qwen_model, ray_cluster, tmp_path):
    write_shards(tmp_path / "in", [{"text": sample_texts(ROWS, seed=s)} for s in range(SHARDS)])
    cfg = validate({"input": {"path": str(tmp_path / "in")},
                    "backend": {"model": str(qwen_model), "micro_batch_size": 1},
                    "resources": {"batch_size": 50},
                    "output": {"path": str(tmp_path / "out")}}, model=ClassifyConfig)
    # Actors of earlier tests wind down asynchronously: wait until they are gone, so the
    # process killed below is this run's.
    deadline = time.monotonic() + 60
    while classifier_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not classifier_processes(), "a classifier actor of an earlier test is still alive"
    with KillOnceAtWork("HFClassifier") as killer:
        summary = run_classify(cfg)
    assert killer.killed, "no classifier actor was killed: the test did not test anything"
    table = pa.concat_tables(pq.read_table(p) for p in (tmp_path / "out").glob("*.parquet"))
    ids = table.column("id").to_pylist()
    assert summary.rows_out == summary.rows_in == len(ids) == len(set(ids)) == SHARDS * ROWS
