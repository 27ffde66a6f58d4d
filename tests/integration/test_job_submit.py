"""`ray job submit -- python jobs/classify.py --config FILE` and `jobs/nightly.sh` against a
Ray head of their own (tests/ray_nodes.py).

This is how people run clsjob: the repo is uploaded as the job's working dir and the entry
script joins the cluster through RAY_ADDRESS.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import LABELS, REPO, sample_texts, write_shards
from clsjob.contract import LOCK
from ray_nodes import RAY, start_head, stop_cluster
from tiny_models import build_qwen2_classifier

pytestmark = pytest.mark.slow

SHARD_ROWS = [30, 25]
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    head = start_head(tmp_path_factory.mktemp("head"), num_cpus=4)
    try:
        yield head
    finally:
        stop_cluster(head)


def test_ray_job_submit_classify(ray_head, tmp_path):
    model = build_qwen2_classifier(tmp_path / "model", LABELS)
    shards = [{"text": pa.array(sample_texts(n, seed=i), pa.string()),
               "label": [LABELS[j % len(LABELS)] for j in range(n)]}
              for i, n in enumerate(SHARD_ROWS)]
    write_shards(tmp_path / "in", shards)
    out = tmp_path / "out"
    config = tmp_path / "classify.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"path": str(tmp_path / "in"), "text_column": "text", "label_column": "label"},
        "backend": {"kind": "hf", "model": str(model), "max_length": 64},
        "resources": {"actors": 1, "cpus_per_actor": 1},
        "output": {"path": str(out), "rows_per_part": 16},
    }))

    cmd = [str(RAY), "job", "submit", "--address", ray_head.dashboard,
           "--working-dir", str(REPO), "--", "python", "jobs/classify.py", "--config", str(config)]
    job = subprocess.run(cmd, env=ray_head.env, capture_output=True, text=True,
                         timeout=JOB_TIMEOUT_S)
    log = f"stdout:\n{job.stdout[-6000:]}\nstderr:\n{job.stderr[-3000:]}"
    assert job.returncode == 0, log

    rows_in = sum(SHARD_ROWS)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_errored"]) == (rows_in, rows_in, 0), log
    table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("*.parquet")))
    assert table.num_rows == rows_in
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == rows_in
    assert set(table.column("label").to_pylist()) <= set(LABELS)
    assert (out / "_metrics.json").exists() and (out / "report.md").exists()

    # What reached the cluster as the working dir: the code, not the multi-GB venv. Ray 2.60
    # leaves out .git, .venv, venv and __pycache__ by default and honours .gitignore for the
    # rest; the repo's .gitignore must cover .venv too, for a Ray that has no such default
    # (or RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES="").
    unpacked = [p for p in ray_head.temp_dir.glob(
        "session_*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert unpacked, log
    ignored_here = [n for n in (".pytest_cache", "clsjob.egg-info") if (REPO / n).exists()]
    for pkg in unpacked:
        assert (pkg / "jobs" / "classify.py").is_file()
        assert (pkg / "clsjob" / "run" / "pipeline.py").is_file()
        assert not (pkg / ".venv").exists()
        for name in ignored_here:  # excluded only through .gitignore
            assert not (pkg / name).exists(), name
    if shutil.which("git") and (REPO / ".git").exists():
        # As a folder: `.venv/` matches folders only, and a checkout without a venv has none.
        check = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", ".venv/"])
        assert check.returncode == 0, ".gitignore does not cover .venv"


NIGHTLY = REPO / "jobs" / "nightly.sh"


def nightly_setup(tmp_path, days: list[str]):
    """One input folder per day and a config that names them through {date} templates."""
    model = build_qwen2_classifier(tmp_path / "model", LABELS)
    for day in days:
        write_shards(tmp_path / "in" / day, [{"text": sample_texts(20, seed=i)} for i in range(2)])
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"path": str(tmp_path / "in" / "{date}")},
        "backend": {"model": str(model), "max_length": 64},
        "output": {"path": str(tmp_path / "out" / "day={date:%Y%m%d}"), "rows_per_part": 16}}))
    return config


def run_nightly(ray_head, config, day: str, tries: int) -> subprocess.CompletedProcess:
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.dashboard, "CLSJOB_RAY": str(RAY),
           "CLSJOB_TRIES": str(tries), "CLSJOB_RETRY_WAIT_S": "1"}
    return subprocess.run(["bash", str(NIGHTLY), str(config), day], env=env, cwd="/",
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


def test_nightly_runs_one_day_and_a_rerun_does_nothing(ray_head, tmp_path):
    config = nightly_setup(tmp_path, ["2026-11-28", "2026-11-29"])
    first = run_nightly(ray_head, config, "2026-11-29", tries=2)
    log = f"stdout:\n{first.stdout[-4000:]}\nstderr:\n{first.stderr[-2000:]}"
    assert first.returncode == 0, log
    assert "attempt 1/2" in first.stderr and "attempt 2/2" not in first.stderr, log

    out = tmp_path / "out" / "day=20261129"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows_out"] == 40
    assert all("/in/2026-11-29/" in s["path"] for s in manifest["shards"])
    assert not (tmp_path / "out" / "day=20261128").exists()  # only the day asked for
    assert not (out / LOCK).exists()  # released at the end

    again = run_nightly(ray_head, config, "2026-11-29", tries=1)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "already holds this finished run" in again.stdout
    assert json.loads((out / "_manifest.json").read_text())["run_id"] == manifest["run_id"]


def test_nightly_never_overlaps_a_running_day_and_gives_up_after_its_tries(ray_head, tmp_path):
    config = nightly_setup(tmp_path, ["2026-11-30"])
    out = tmp_path / "out" / "day=20261130"
    out.mkdir(parents=True)
    # The lock of a run in progress: this very test process, on this host, beating now.
    now = datetime.now(timezone.utc).isoformat()
    running = {"owner": "running-run", "host": socket.gethostname(), "pid": os.getpid(),
               "started_at": now, "heartbeat_at": now}
    (out / LOCK).write_text(json.dumps(running))

    result = run_nightly(ray_head, config, "2026-11-30", tries=2)
    log = f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-2000:]}"
    assert result.returncode == 1, log
    assert len(re.findall(r"attempt \d/2 as clsjob-", result.stderr)) == 2, log  # bounded
    assert "failed 2 times; giving up" in result.stderr, log
    assert "another run holds this output" in result.stdout, log
    assert result.stdout.count("Job entrypoint command failed with exit code 2") == 2, log
    assert not list(out.glob("*.parquet")) and not (out / "_manifest.json").exists()
    assert json.loads((out / LOCK).read_text()) == running  # the running day's lock untouched


def test_nightly_reports_drift_against_the_day_before_and_fails_after_writing(ray_head, tmp_path):
    """Day 1, then day 2 whose texts the model mostly calls `negative`: day 2's manifest and
    report hold the drift against day 1, and past fail_above.psi nightly.sh exits 3 (not
    retried) with day 2's outputs complete; day 1, with no day before it, is not compared."""
    from clsjob.backends.hf import load_classifier, predict_probs
    from clsjob.config import HFBackendConfig

    model = build_qwen2_classifier(tmp_path / "model", LABELS)
    pool = sample_texts(300, seed=5)
    net, tok = load_classifier(HFBackendConfig(model=str(model)), "cpu")
    said = predict_probs(net, tok, pool, 64, 32, "cpu").argmax(axis=1)
    by_label = [[t for t, k in zip(pool, said) if k == label] for label in range(3)]
    days = {"2026-11-28": by_label[0][:2] + by_label[1][:14] + by_label[2][:14],
            "2026-11-29": by_label[0][:20] + by_label[1][14:19] + by_label[2][14:19]}
    for day, texts in days.items():
        write_shards(tmp_path / "in" / day, [{"text": texts, "label": [LABELS[i % 3] for i in range(30)]}])
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"path": str(tmp_path / "in" / "{date}"), "label_column": "label"},
        "backend": {"model": str(model), "max_length": 64, "dtype": "float32"},
        "output": {"path": str(tmp_path / "out" / "day={date:%Y%m%d}"), "rows_per_part": 16},
        "monitor": {"baseline": str(tmp_path / "out" / "day={date-1:%Y%m%d}"),
                    "fail_above": {"psi": 0.2}}}))

    first = run_nightly(ray_head, config, "2026-11-28", tries=2)
    assert first.returncode == 0, first.stdout[-3000:]
    day1 = json.loads((tmp_path / "out" / "day=20261128" / "_manifest.json").read_text())
    assert day1["drift"] == {"baseline": str(tmp_path / "out" / "day=20261127"), "compared": False,
                             "why": "no manifest", "alerts": []}
    assert day1["distribution"]["labels"] == {"negative": 2, "neutral": 14, "positive": 14}

    second = run_nightly(ray_head, config, "2026-11-29", tries=3)
    log = f"stdout:\n{second.stdout[-4000:]}\nstderr:\n{second.stderr[-2000:]}"
    assert second.returncode == 3, log
    assert "attempt 2/3" not in second.stderr and "drifted past monitor.fail_above" in second.stderr, log
    out = tmp_path / "out" / "day=20261129"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows_out"] == 30  # written before failing
    drift = manifest["drift"]
    assert drift["compared"] and drift["psi"] > 0.2 and drift["alerts"][0].startswith("psi ")
    assert drift["label_shares"]["negative"] == {"now": pytest.approx(20 / 30), "baseline": pytest.approx(2 / 30)}
    assert json.loads((out / "_metrics.json").read_text())["drift"] == drift
    assert "## Drift against the baseline" in (out / "report.md").read_text()
