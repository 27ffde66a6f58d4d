"""`ray job submit -- python jobs/classify.py --config FILE` against a Ray head of its own.

This is how people run clsjob: the repo is uploaded as the job's working dir and the entry
script joins the cluster through RAY_ADDRESS. The head is started here with the venv's `ray`
CLI, separate from the in-process cluster other tests share (the `ray_cluster` fixture), and
is torn down without touching that one.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import LABELS, REPO, sample_texts, write_shards
from tiny_models import build_qwen2_classifier

pytestmark = pytest.mark.slow

# The venv's bin folder, not the resolved interpreter: sys.executable is a link into the venv.
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
SHARD_ROWS = [30, 25]
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300


@dataclass(frozen=True)
class RayHead:
    dashboard: str       # http://127.0.0.1:<port>, what `ray job submit --address` takes
    temp_dir: Path
    env: dict            # the environment a client of this head needs (token, PATH)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    if not RAY.exists():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    # Short: Ray puts Unix sockets below it, and socket paths are limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE")}
    # PATH: `python` in the job's entrypoint must be the venv's. The token is explicit so the
    # test neither depends on nor writes ~/.ray/auth_token: `ray start` turns token auth on
    # only when a token exists, and `ray job submit` then needs RAY_AUTH_MODE=token.
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    dashboard_port = free_port()
    cmd = [str(RAY), "start", "--head", "--block", "--disable-usage-stats",
           f"--port={free_port()}", f"--dashboard-port={dashboard_port}",
           "--dashboard-host=127.0.0.1", "--num-cpus=4",
           f"--ray-client-server-port={free_port()}",
           # Fixed by default (52365): would clash with any other Ray on this machine.
           f"--dashboard-agent-listen-port={free_port()}",
           # 0 = ports the OS picks, instead of the 10002-19999 range every Ray shares.
           "--min-worker-port=0", "--max-worker-port=0",
           f"--temp-dir={temp_dir}"]
    log_path = tmp_path / "ray-head.log"
    # --block in a session of its own: the head's processes are then exactly that session,
    # and SIGTERM to this one process makes Ray's reaper end the rest (see stop_head).
    # Ray 2.60 drains a `--block` head on SIGTERM for up to 30 s, and after a job it is never
    # idle enough to finish early: a test head has nothing to drain.
    head_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        wait_for_job_api(dashboard, token, proc, log_path)
        yield RayHead(dashboard, temp_dir, env)
    finally:
        stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_job_api(dashboard: str, token: str, proc: subprocess.Popen, log_path: Path) -> None:
    request = urllib.request.Request(f"{dashboard}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"Ray job API not up after {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


def stop_head(proc: subprocess.Popen) -> None:
    """End this head's processes and no others.

    Not `ray stop`: it ends every Ray process on the machine by name, which includes the
    in-process cluster of the other tests and anyone else's Ray.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # Whatever the reaper missed is still in the session that Popen created (its id is the
    # pid of `ray start`); workers change process group but not session.
    deadline = time.monotonic() + 10
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def session_pids(sid: int) -> list[int]:
    import psutil  # comes with ray[default]

    pids = []
    for pid in psutil.pids():
        try:
            if pid != os.getpid() and os.getsid(pid) == sid:
                pids.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


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
        "resources": {"actors": 1, "cpus_per_actor": 1, "batch_size": 16},
        "output": {"path": str(out)},
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
        assert (pkg / "clsjob" / "pipeline.py").is_file()
        assert not (pkg / ".venv").exists()
        for name in ignored_here:  # excluded only through .gitignore
            assert not (pkg / name).exists(), name
    if shutil.which("git") and (REPO / ".git").exists():
        check = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", ".venv"])
        assert check.returncode == 0, ".gitignore does not cover .venv"
