"""The run lock on local disk (the S3 conditional create is exercised in tests/integration)."""
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from clsjob.config import StorageConfig
from clsjob.contract import LOCK
from clsjob.run.lock import RunLock, RunLocked

LOCAL = StorageConfig()


def write_lock(folder, **fields):
    held = {"owner": "someone", "host": socket.gethostname(), "pid": os.getpid(),
            "started_at": datetime.now(timezone.utc).isoformat(),
            "heartbeat_at": datetime.now(timezone.utc).isoformat(), **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK).write_text(json.dumps(held))


def test_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    with RunLock(str(tmp_path), LOCAL, stale_after_s=600) as first:
        held = json.loads((tmp_path / LOCK).read_text())
        assert held["owner"] == first.owner and held["pid"] == os.getpid()
        with pytest.raises(RunLocked, match=rf"{LOCK}: another run holds this output .* pid {os.getpid()}"):
            with RunLock(str(tmp_path), LOCAL, stale_after_s=600):
                pass
        assert json.loads((tmp_path / LOCK).read_text())["owner"] == first.owner  # untouched
    assert not (tmp_path / LOCK).exists()  # released
    with RunLock(str(tmp_path), LOCAL, stale_after_s=600):  # and free again
        pass


def test_lock_of_an_ended_process_on_this_host_is_taken_over(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    write_lock(tmp_path, pid=int(ended.stdout))
    with RunLock(str(tmp_path), LOCAL, stale_after_s=600) as lock:
        assert json.loads((tmp_path / LOCK).read_text())["owner"] == lock.owner


def test_lock_of_another_host_waits_for_its_heartbeat_to_go_stale(tmp_path):
    write_lock(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(RunLocked):
        with RunLock(str(tmp_path), LOCAL, stale_after_s=600):
            pass
    old = (datetime.now(timezone.utc) - timedelta(seconds=700)).isoformat()
    write_lock(tmp_path, host="elsewhere", pid=1, heartbeat_at=old)
    with RunLock(str(tmp_path), LOCAL, stale_after_s=600) as lock:
        assert json.loads((tmp_path / LOCK).read_text())["owner"] == lock.owner


def test_heartbeat_refreshes_the_lock_and_notices_a_takeover(tmp_path):
    with RunLock(str(tmp_path), LOCAL, stale_after_s=5) as lock:  # beats every second
        first = json.loads((tmp_path / LOCK).read_text())["heartbeat_at"]
        deadline = datetime.now() + timedelta(seconds=10)
        while json.loads((tmp_path / LOCK).read_text())["heartbeat_at"] == first:
            assert datetime.now() < deadline, "no heartbeat"
            time.sleep(0.05)
        write_lock(tmp_path, owner="usurper")
        while not lock.lost:
            assert datetime.now() < deadline + timedelta(seconds=5), "takeover not noticed"
            time.sleep(0.05)
    # The lock is the usurper's now: releasing ours must not delete it.
    assert json.loads((tmp_path / LOCK).read_text())["owner"] == "usurper"
