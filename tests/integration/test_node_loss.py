"""A worker node lost mid-run, on a multi-node Ray started with `ray start` on this machine.

The head holds no CPUs (it runs the driver only). Node B joins first and takes both
classifier actors; node A joins once they are at work, as an autoscaler would add capacity.
Then every process of node B — raylet, object store, actors, tasks — is SIGKILLed, as when a
machine dies. Ray marks the node dead, restarts the actors on A and re-runs the lost tasks;
the run must still write every row exactly once.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import REPO, sample_texts, write_shards
from ray_nodes import kill_session, session_pids, start_head, start_worker, stop_cluster

pytestmark = pytest.mark.slow
SHARDS, ROWS = 8, 300
RUN_TIMEOUT_S = 420


def classifier_pids(session: int) -> list[int]:
    found = []
    for pid in session_pids(session):
        try:
            title = " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            continue
        if title.startswith("ray::") and "HFClassifier" in title:
            found.append(pid)
    return found


def wait_for(what: str, check, driver: subprocess.Popen, log, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if driver.poll() is not None:
            pytest.fail(f"the driver ended ({driver.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def test_losing_a_worker_node_loses_no_rows(qwen_model, tmp_path):
    write_shards(tmp_path / "in", [{"text": sample_texts(ROWS, seed=s)} for s in range(SHARDS)])
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    # One row per forward pass and small parts: slow enough to lose a node half way.
    config.write_text(yaml.safe_dump({
        "input": {"path": str(tmp_path / "in")},
        "backend": {"model": str(qwen_model), "micro_batch_size": 1},
        "resources": {"actors": 2, "batch_size": 50},
        "output": {"path": str(out)}}))

    head = start_head(tmp_path, num_cpus=0)
    try:
        # 3 CPUs: both actors and one reader/writer task at a time.
        node_b = start_worker(head, tmp_path / "node-b.log", num_cpus=3)
        log = tmp_path / "driver.log"
        with open(log, "wb") as sink:
            driver = subprocess.Popen(
                [sys.executable, "-m", "clsjob.cli", "classify", "--config", str(config)],
                cwd=REPO, env={**head.env, "RAY_ADDRESS": head.gcs_address},
                stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for("both actors run on node B", lambda: len(classifier_pids(node_b.pid)) == 2,
                     driver, log)
            node_a = start_worker(head, tmp_path / "node-a.log", num_cpus=3)
            wait_for("the first parts", lambda: len(list(out.glob("*.parquet"))) >= 2, driver, log)
            parts_before = len(list(out.glob("*.parquet")))
            assert parts_before < SHARDS * ROWS // 50, "the run ended before the node was lost"
            assert kill_session(node_b.pid) >= 3  # raylet, agents, actors, workers
            # Ray notices the node is gone and brings the actors back on A.
            wait_for("actors restarted on node A", lambda: classifier_pids(node_a.pid),
                     driver, log)
            driver.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if driver.poll() is None:
                driver.kill()
        assert driver.returncode == 0, log.read_text()[-6000:]
    finally:
        stop_cluster(head)

    table = pa.concat_tables(pq.read_table(p) for p in out.glob("*.parquet"))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == SHARDS * ROWS
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows_out"] == SHARDS * ROWS
