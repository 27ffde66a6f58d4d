"""One run per output folder at a time: a lock file in the output location itself.

The lock lives beside the data it protects, so it holds whoever starts the run — cron on one
machine, a KubeRay RayJob, a person — and on any store: it is created with an exclusive
write (S3's conditional PUT, a hard link locally) and kept fresh by a heartbeat. A lock
whose holder is gone is taken over: at once when the holder was a process on this same
machine that no longer exists (a killed driver being rerun), otherwise once its heartbeat is
older than `stale_after_s`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timezone

from clsjob import store
from clsjob.config import StorageConfig
from clsjob.contract import LOCK

log = logging.getLogger("clsjob")


class RunLocked(RuntimeError):
    """Another run holds this output folder."""


class RunLock:
    def __init__(self, output: str, storage: StorageConfig, stale_after_s: float):
        self.url = store.join(output, LOCK)
        self.storage, self.stale_after_s = storage, stale_after_s
        self.owner = uuid.uuid4().hex
        self.started_at = datetime.now(timezone.utc).isoformat()
        self.lost = False  # set if another run took the lock over while this one held it
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="clsjob-lock")

    def __enter__(self) -> "RunLock":
        if not store.create_exclusive(self._content(), self.url, self.storage):
            held = self._read()
            reason = stale_reason(held, self.stale_after_s)
            if not reason:
                raise RunLocked(
                    f"{self.url}: another run holds this output (host {held.get('host')}, "
                    f"pid {held.get('pid')}, started {held.get('started_at')}, last heartbeat "
                    f"{held.get('heartbeat_at')}); it is taken over once its heartbeat is "
                    f"{self.stale_after_s:.0f} s old")
            log.warning("classify: taking over the lock of a run that is gone (%s)", reason)
            store.remove(self.url, self.storage)
            if not store.create_exclusive(self._content(), self.url, self.storage):
                raise RunLocked(f"{self.url}: another run took this output over just now")
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join()
        if self._read().get("owner") == self.owner:
            store.remove(self.url, self.storage)

    def _content(self) -> str:
        now = datetime.now(timezone.utc).isoformat()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "started_at": self.started_at, "heartbeat_at": now})

    def _read(self) -> dict:
        try:
            return store.read_json(self.url, self.storage)
        except FileNotFoundError:
            return {}

    def _heartbeat(self) -> None:
        every = max(1.0, min(60.0, self.stale_after_s / 10))
        while not self._stop.wait(every):
            if self._read().get("owner") != self.owner:
                self.lost = True
                log.error("classify: %s was taken over by another run", self.url)
                return
            store.write_text(self._content(), self.url, self.storage)


def stale_reason(held: dict, stale_after_s: float) -> str | None:
    """Why a lock's holder counts as gone, or None if it may still be running."""
    if not held:
        return "the lock file is empty or was just removed"
    if held.get("host") == socket.gethostname() and not pid_alive(held.get("pid")):
        return f"process {held.get('pid')} on this host has ended"
    beat = datetime.fromisoformat(held["heartbeat_at"])
    age = (datetime.now(timezone.utc) - beat).total_seconds()
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f} s"
    return None


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or no pid recorded: assume it runs
    return True
