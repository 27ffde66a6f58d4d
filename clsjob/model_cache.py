"""Model folders kept in object storage (s3://…), made local on the nodes that load them.

transformers, peft and vLLM load a model from a local folder. A node fetches each model once
into its cache (`storage.model_cache`), however many actors or training workers it runs:

- the first to ask takes an exclusive lock (flock on a file beside the entry), so the others
  wait instead of fetching the same gigabytes alongside it;
- it fetches into a temporary folder, checks every file's size against the listing, and
  renames the folder into place: the entry appears complete or not at all, and a fetch cut
  short (a killed actor, a full disk) is never loaded — the next one clears it and starts over;
- the entry's name holds a hash of the model's path and of its files' sizes and ETags, so a
  model replaced in storage is fetched anew, never served stale from the cache.

A model folder is flat: the files directly in it are fetched, its subfolders are not (a
fine-tune output keeps Ray Train's checkpoints in `ray/`, which no loader reads).

Local paths pass through unchanged. Entries are never evicted: the cache holds each version
of each model a node has run (clear it with the node's other scratch space)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from clsjob import store
from clsjob.config import StorageConfig

log = logging.getLogger("clsjob")


def is_remote(path: str) -> bool:
    return path.startswith("s3://")


def entry_name(url: str, files: list[store.RemoteFile]) -> str:
    """The cache folder name of this version of the model at `url`."""
    listing = json.dumps([url, [[f.name, f.size, f.tag] for f in files]])
    stem = posixpath.basename(url.rstrip("/")) or "model"
    return f"{stem}-{hashlib.sha256(listing.encode()).hexdigest()[:16]}"


def local_model(path: str, storage: StorageConfig, key: str = "backend.model") -> str:
    """A local folder holding the model at `path`: a local path as it is, an s3:// one from
    this node's cache (fetched first if the node has not got it). `key` names the setting in
    errors."""
    if not is_remote(path):
        return path
    files = store.list_folder(path, storage)
    if not files:
        raise FileNotFoundError(f"{key}: no model files under {path}")
    root = Path(storage.model_cache).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    name = entry_name(path, files)
    entry = root / name
    if entry.is_dir():  # complete by construction: entries appear only by rename
        return str(entry)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not entry.is_dir():  # another process may have fetched it while this one waited
            fetch_entry(path, files, root, name, storage)
    return str(entry)


def fetch_entry(url: str, files: list[store.RemoteFile], root: Path, name: str,
                storage: StorageConfig) -> None:
    """Fetch the model into `root/name`, holding the entry's lock."""
    for stale in root.glob(f".{name}.*.partial"):  # left by a fetch that did not finish
        shutil.rmtree(stale, ignore_errors=True)
    size = sum(f.size for f in files)
    free = shutil.disk_usage(root).free
    if size > free:
        raise OSError(f"storage.model_cache: {root} has {free / 2**30:.1f} GiB free; "
                      f"{url} needs {size / 2**30:.1f} GiB")
    partial = root / f".{name}.{uuid.uuid4().hex}.partial"
    started = time.monotonic()
    log.info("model cache: fetching %s (%d files, %.2f GiB) into %s", url, len(files),
             size / 2**30, root)
    try:
        store.fetch_files(url, files, str(partial), storage)
        os.rename(partial, root / name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("model cache: %s fetched in %.1f s", url, time.monotonic() - started)


def model_config(path: str, storage: StorageConfig, key: str = "backend.model") -> tuple[dict, list[str]]:
    """The model's config.json and the names of all its files, without fetching the weights:
    what the driver checks before a run starts (it may run on a node without GPUs that never
    loads the model)."""
    if is_remote(path):
        names = [f.name for f in store.list_folder(path, storage)]
        if not names:
            raise FileNotFoundError(f"{key}: no model files under {path}")
        config_url = store.join(path, "config.json")
        return (store.read_json(config_url, storage) if "config.json" in names else {}), names
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{key}: no model folder at {folder}")
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    config = folder / "config.json"
    return (json.loads(config.read_text()) if config.exists() else {}), names


def publish_folder(build, path: str, storage: StorageConfig) -> str:
    """Write a model folder to `path`: `build(folder)` writes it into a local folder, which
    is `path` itself when local, and a temporary one uploaded afterwards when s3://."""
    if not is_remote(path):
        Path(path).mkdir(parents=True, exist_ok=True)
        build(Path(path))
        return path
    with tempfile.TemporaryDirectory(prefix="clsjob-publish-") as tmp:
        build(Path(tmp))
        store.put_folder(tmp, path, storage)
    return path
