"""Ray clusters of their own for tests, started with the venv's `ray` CLI as people start them:
a head (with the dashboard and job API) and, for multi-node tests, worker nodes on this same
machine. Each node runs `ray start --block` in a process session of its own, so a node's
processes are exactly that session: stopping or killing a node touches nothing else — not
the in-process cluster the other tests share, not anyone else's Ray.
"""
from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # comes with ray[default]
import pytest

# The venv's bin folder, not the resolved interpreter: sys.executable is a link into the venv.
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
START_TIMEOUT_S = 120


@dataclass
class RayHead:
    dashboard: str       # http://127.0.0.1:<port>, what `ray job submit --address` takes
    gcs_address: str     # 127.0.0.1:<port>, what RAY_ADDRESS / `ray start --address` take
    temp_dir: Path
    env: dict            # the environment a client of this head needs (token, PATH)
    proc: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env() -> tuple[dict, str]:
    """The environment for the nodes and their clients, and the token it carries."""
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE")}
    # PATH: `python` in a job's entrypoint must be the venv's. The token is explicit so the
    # tests neither depend on nor write ~/.ray/auth_token: `ray start` turns token auth on
    # only when a token exists, and `ray job submit` then needs RAY_AUTH_MODE=token.
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env, token


def node_ports() -> list[str]:
    # Ports that are fixed by default and would clash between nodes on one machine, and with
    # any other Ray here; 0 for workers = ports the OS picks, not the shared 10002-19999.
    return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0"]


def start_node(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    # Ray 2.60 drains a `--block` node on SIGTERM for up to 30 s, and after a job it is never
    # idle enough to finish early: a test node has nothing to drain.
    node_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, env=node_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def start_head(log_dir: Path, num_cpus: int) -> RayHead:
    if not RAY.exists():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    # Short: Ray puts Unix sockets below it, and socket paths are limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    env, token = client_env()
    gcs_port, dashboard_port = free_port(), free_port()
    cmd = [str(RAY), "start", "--head", "--block", "--disable-usage-stats",
           f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
           "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}",
           f"--ray-client-server-port={free_port()}", *node_ports(), f"--temp-dir={temp_dir}"]
    log_path = log_dir / "ray-head.log"
    proc = start_node(cmd, env, log_path)
    head = RayHead(f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{gcs_port}", temp_dir,
                   env, proc)
    try:
        wait_for_job_api(head.dashboard, token, proc, log_path)
    except BaseException:
        stop_cluster(head)
        raise
    return head


def start_worker(head: RayHead, log_path: Path, num_cpus: int, tries: int = 3) -> subprocess.Popen:
    """Join a worker node to `head`; returns once the cluster counts its CPUs. A node gives
    up when the GCS has not seen it register within 30 s (fixed in Ray 2.60), which a loaded
    machine can exceed: such a start is tried again."""
    before = cluster_cpus(head)
    for attempt in range(1, tries + 1):
        cmd = [str(RAY), "start", "--block", "--disable-usage-stats",
               f"--address={head.gcs_address}", f"--num-cpus={num_cpus}", *node_ports()]
        proc = start_node(cmd, head.env, log_path)
        head.workers.append(proc)
        deadline = time.monotonic() + START_TIMEOUT_S
        while cluster_cpus(head) < before + num_cpus:
            if proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"worker node not up after {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        else:
            return proc
        if attempt == tries:
            pytest.fail(f"worker node exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        kill_session(proc.pid)
    raise AssertionError("unreachable")


def cluster_cpus(head: RayHead) -> float:
    out = subprocess.run([str(RAY), "status", f"--address={head.gcs_address}"], env=head.env,
                         capture_output=True, text=True, timeout=60).stdout
    # "Total Usage:" lists e.g. " 0.0/5.0 CPU"
    for line in out.splitlines():
        line = line.strip()
        if line.endswith(" CPU") and "/" in line:
            return float(line.split()[0].split("/")[1])
    return 0.0


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


def stop_cluster(head: RayHead) -> None:
    """Workers first, then the head. Not `ray stop`: it ends every Ray process on the
    machine by name, which includes the other tests' cluster and anyone else's Ray."""
    for proc in [*head.workers, head.proc]:
        stop_node(proc)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def stop_node(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # Ray's reaper then ends the node's processes
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    kill_session(proc.pid)


def kill_session(sid: int) -> int:
    """SIGKILL every process of a node's session (its id is the pid of `ray start`); workers
    change process group but not session. Returns how many were killed."""
    killed = 0
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


def session_pids(sid: int) -> list[int]:
    pids = []
    for pid in psutil.pids():
        try:
            if pid != os.getpid() and os.getsid(pid) == sid:
                pids.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return pids
