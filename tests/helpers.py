"""Helpers the tests share (fixtures live in conftest.py). `tests/` is on pytest's path
(pyproject's `pythonpath`), so tests import these as `from helpers import ...`."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LABELS = ["negative", "neutral", "positive"]
# Dummy credentials for the moto S3 tests. A Ray worker's environment is fixed when Ray starts,
# so they go into the session cluster's runtime_env (distinctive values: a leak is greppable).
TEST_AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIACLSJOBTESTKEY0001",
                "AWS_SECRET_ACCESS_KEY": "clsjob-test-secret-5f0c2a9e7d41b8c3",
                "AWS_DEFAULT_REGION": "us-east-1"}


def cluster_processes(title: str) -> list:
    """Worker processes of this session's Ray cluster (children of its raylet) whose title
    holds `title`: a fault test must never pick a process of another Ray on the machine."""
    import psutil
    from ray._private import ray_constants
    from ray._private.worker import _global_node

    raylet = _global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    found = []
    for proc in psutil.Process(raylet).children():
        try:
            cmdline = proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        if cmdline and cmdline[0].startswith("ray::") and title in " ".join(cmdline):
            found.append(proc)
    return found


class KillOnceAtWork:
    """While in the `with` block: SIGKILL the first of this cluster's processes titled `title`
    (as the OOM killer would) once it has been at work for a moment. `killed` holds its pid."""

    def __init__(self, title: str, after_s: float = 1.0):
        import threading

        self.title, self.after_s, self.killed = title, after_s, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch)

    def __enter__(self) -> "KillOnceAtWork":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _watch(self) -> None:
        import signal
        import time

        import psutil

        while not self.stop.is_set():
            for proc in cluster_processes(self.title):
                time.sleep(self.after_s)  # let it take a chunk or two first
                try:
                    proc.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    continue
                self.killed.append(proc.pid)
                return
            time.sleep(0.2)


def kill_driver_after_first_shard(config: Path, output: Path, ray_cluster) -> dict[str, int]:
    """Run `clsjob classify --config config` as a driver joined to the session's cluster and
    SIGKILL it as soon as one shard is done (exactly losing the driver mid-run); the finished
    shards' markers, name -> mtime."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from clsjob.contract import PROGRESS

    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "clsjob.cli", "classify", "--config", str(config)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress, deadline = output / PROGRESS, time.monotonic() + 240
    while not (progress.exists() and any(progress.glob("*.json"))):
        assert driver.poll() is None, "the driver ended before any shard was done"
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    return {p.name: p.stat().st_mtime_ns for p in progress.glob("*.json")}


def sample_texts(n: int, seed: int = 0) -> list[str]:
    """Varied lengths, so padding and length sorting matter."""
    import random

    rng = random.Random(seed)
    words = "the film was a delight dull tedious card payment parcel arrived account".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def write_shards(folder: Path, shards: list[dict]) -> list[Path]:
    """Write one Parquet file per dict of columns; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, columns in enumerate(shards):
        path = folder / f"shard-{i:03d}.parquet"
        pq.write_table(pa.table(columns), path)
        paths.append(path)
    return paths


def shipped_classify(name: str, model, tmp_path: Path, *overrides: str, day=None):
    """A shipped classify config at tiny scale: only the data, the model (a tiny one of the
    right kind) and one CPU actor are swapped; every other setting runs as shipped."""
    from clsjob.config import ClassifyConfig, load_config

    return load_config(REPO / "configs" / name, [
        f"input.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}",
        f"backend.model={model}", "resources.actors=1", "resources.gpus_per_actor=0",
        "resources.cpus_per_actor=1", "output.rows_per_part=16", *overrides],
        model=ClassifyConfig, day=day)


def check_output_contract(summary, output: Path, rows: int, errored: int) -> list[dict]:
    """Rows out = rows in, ids unique, a complete manifest; returns the output rows."""
    import json

    table = pa.concat_tables(pq.read_table(p) for p in sorted(output.glob("*.parquet")))
    out = table.to_pylist()
    assert summary.rows_in == summary.rows_out == len(out) == rows
    assert summary.rows_errored == errored == sum(r["error"] is not None for r in out)
    ids = [r.get("id") for r in out]
    assert len(set(ids)) == rows
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows_out"] == rows
    return out
