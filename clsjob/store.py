"""The only module that touches storage: list and read shards, write parts and JSON files,
list, fetch and upload the files of a model folder (model_cache.py decides where they go).

Local paths, file:// and s3:// all go through fsspec (s3fs for S3), so one code path serves
both. S3 credentials come only from the environment or the AWS chain (s3fs/botocore find
them); nothing here reads, prints or stores them.
"""
from __future__ import annotations

import glob as globlib
import json
import os
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clsjob.config import StorageConfig


class InputError(ValueError):
    """Input that cannot be read as configured; the message names the file and column."""


def filesystem(path: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `path` and the path as that filesystem names it."""
    if path.startswith("s3://"):
        import s3fs  # imported here so local-only runs never need botocore set up

        client_kwargs = {"region_name": storage.region} if storage.region else {}
        # botocore's "standard" retry mode retries throttling, 5xx and connection errors with
        # exponential backoff and jitter (its default, "legacy", tries 5 times and knows fewer
        # errors). s3fs has its own loop on top for errors met while reading a body; both get
        # the same bound, so max_attempts: 1 really means no retry.
        fs = s3fs.S3FileSystem(
            endpoint_url=storage.endpoint_url, client_kwargs=client_kwargs,
            config_kwargs={"retries": {"total_max_attempts": storage.max_attempts, "mode": "standard"}})
        fs.retries = storage.max_attempts  # a class attribute, not a constructor argument
        return fs, path[len("s3://"):]
    if path.startswith("file://"):
        path = path[len("file://"):]
    return fsspec.filesystem("file"), os.path.abspath(path)


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return f"s3://{path}" if "s3" in fs.protocol else path


def join(base: str, *names: str) -> str:
    return posixpath.join(base.rstrip("/"), *names)


def list_shards(path: str | list[str], storage: StorageConfig) -> list[str]:
    """Expand a folder, glob, file or list of those into a sorted list of Parquet files."""
    found: list[str] = []
    for item in [path] if isinstance(path, str) else path:
        fs, p = filesystem(item, storage)
        if globlib.has_magic(p):
            matches = [m for m in fs.glob(p) if fs.isfile(m)]
        elif fs.isdir(p):
            matches = [m for m in fs.find(p) if m.endswith(".parquet")
                       and not posixpath.basename(m).startswith(("_", "."))]
        elif fs.isfile(p):
            matches = [p]
        else:
            raise InputError(f"input.path: nothing found at {item}")
        if not matches:
            raise InputError(f"input.path: no Parquet files at {item}")
        found.extend(_url(fs, m) for m in matches)
    return sorted(dict.fromkeys(found))


def shard_keys(shards: list[str]) -> list[str]:
    """Short, stable names for shards: the path below their common folder. They name the
    derived row ids and the output parts, so they must not depend on where the job runs."""
    if len(shards) == 1:
        return [posixpath.basename(shards[0])]
    common = posixpath.commonpath([s.replace("s3://", "/", 1) for s in shards])
    return [posixpath.relpath(s.replace("s3://", "/", 1), common) for s in shards]


@dataclass(frozen=True)
class ShardInfo:
    path: str
    key: str
    rows: int
    schema: pa.Schema | None
    error: str | None = None  # why the file cannot be read as Parquet


def inspect_shards(shards: list[str], storage: StorageConfig, threads: int = 16) -> list[ShardInfo]:
    """Read every shard's footer (schema and row count) without reading its data. A file
    that is not readable Parquet comes back with `error` set; the caller decides."""
    keys = shard_keys(shards)

    def one(item: tuple[str, str]) -> ShardInfo:
        url, key = item
        fs, p = filesystem(url, storage)
        with fs.open(p, "rb") as f:
            watched = _Watched(f)
            try:
                meta = pq.ParquetFile(watched).metadata
                return ShardInfo(url, key, meta.num_rows, meta.schema.to_arrow_schema())
            except (pa.ArrowInvalid, OSError) as exc:
                if watched.failed:  # the storage failed, not the file: never skip it for that
                    raise OSError(f"{url}: reading the footer failed after "
                                  f"{storage.max_attempts} tries: {exc}") from exc
                return ShardInfo(url, key, 0, None, f"{url}: not a readable Parquet file ({exc})")

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, zip(shards, keys)))


class _Watched:
    """A file that remembers whether reading it failed. pyarrow reports a corrupt file and a
    storage error after spent retries alike (OSError), and only the first may be skipped."""

    def __init__(self, f):
        self._f, self.failed = f, False

    def read(self, *args):
        try:
            return self._f.read(*args)
        except Exception:
            self.failed = True
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def iter_shard(url: str, columns: list[str], chunk_rows: int,
               storage: StorageConfig) -> Iterator[tuple[int, pa.Table]]:
    """Yield (first row position, table) chunks of one shard, reading only `columns`."""
    fs, p = filesystem(url, storage)
    start = 0
    with fs.open(p, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=chunk_rows, columns=columns):
            yield start, pa.Table.from_batches([batch])
            start += batch.num_rows


def _write_atomic(url: str, storage: StorageConfig, write, mode: str = "wb") -> None:
    """Write a file so that a reader sees all of it or nothing: locally through a temporary
    name and an atomic rename; on S3 a single PUT is already all-or-nothing."""
    fs, p = filesystem(url, storage)
    if "s3" in fs.protocol:
        with fs.open(p, mode) as f:
            write(f)
        return
    fs.makedirs(posixpath.dirname(p), exist_ok=True)
    tmp = posixpath.join(posixpath.dirname(p), f".{posixpath.basename(p)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, mode) as f:
        write(f)
    os.replace(tmp, p)


def create_exclusive(text: str, url: str, storage: StorageConfig) -> bool:
    """Write a small file only if it does not exist yet; False if it does. Atomic on both
    stores: S3's conditional PUT (If-None-Match: *), and locally a hard link, which fails
    when the name is taken, from a temporary file written in full."""
    fs, p = filesystem(url, storage)
    if "s3" in fs.protocol:
        try:
            fs.pipe_file(p, text.encode(), mode="create")
        except FileExistsError:
            return False
        return True
    fs.makedirs(posixpath.dirname(p), exist_ok=True)
    tmp = posixpath.join(posixpath.dirname(p), f".{posixpath.basename(p)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    try:
        os.link(tmp, p)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def write_part(table: pa.Table, url: str, storage: StorageConfig) -> None:
    _write_atomic(url, storage, lambda f: pq.write_table(table, f))


def list_parts(output: str, storage: StorageConfig) -> list[str]:
    fs, p = filesystem(output, storage)
    if not fs.exists(p):
        return []
    # Files and folders named "_..." or "..." are the run's own (_review/, _progress/), as
    # Spark and pyarrow's dataset discovery also take them to be.
    return sorted(_url(fs, m) for m in fs.find(p) if m.endswith(".parquet")
                  and not any(c.startswith(("_", ".")) for c in posixpath.relpath(m, p).split("/")))


def read_table(url: str, storage: StorageConfig, columns: list[str] | None = None) -> pa.Table:
    fs, p = filesystem(url, storage)
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=columns)


def write_text(text: str, url: str, storage: StorageConfig) -> None:
    _write_atomic(url, storage, lambda f: f.write(text), mode="w")


def write_json(data: dict, url: str, storage: StorageConfig) -> None:
    write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", url, storage)


def read_json(url: str, storage: StorageConfig) -> dict:
    fs, p = filesystem(url, storage)
    with fs.open(p, "r") as f:
        return json.load(f)


def exists(url: str, storage: StorageConfig) -> bool:
    fs, p = filesystem(url, storage)
    return fs.exists(p)


def list_files(folder: str, suffix: str, storage: StorageConfig) -> list[str]:
    """Files directly in `folder` ending with `suffix` (none if the folder is absent)."""
    fs, p = filesystem(folder, storage)
    if not fs.exists(p):
        return []
    return sorted(_url(fs, m) for m in fs.ls(p, detail=False) if m.endswith(suffix))


def remove(url: str, storage: StorageConfig) -> None:
    fs, p = filesystem(url, storage)
    if fs.exists(p):
        fs.rm(p, recursive=True)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a folder in storage: its path inside the folder, size and version tag."""
    name: str
    size: int
    tag: str  # S3's ETag (changes with the content); locally the modification time


def list_folder(url: str, storage: StorageConfig) -> list[RemoteFile]:
    """The files directly in the folder `url` (not in its subfolders, and not the empty
    "folder/" markers some S3 writers leave), sorted by name; empty if there are none."""
    fs, p = filesystem(url, storage)
    try:
        # refresh: s3fs would answer from its listing cache, blind to a model replaced since.
        found = fs.ls(p, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    files = [RemoteFile(name=posixpath.basename(info["name"].rstrip("/")),
                        size=int(info.get("size") or 0),
                        tag=str(info.get("ETag") or info.get("mtime") or ""))
             for info in found if info.get("type") == "file" and not info["name"].endswith("/")]
    return sorted((f for f in files if f.name), key=lambda f: f.name)


def fetch_files(url: str, files: list[RemoteFile], target: str, storage: StorageConfig,
                threads: int = 8) -> None:
    """Copy `files` of the folder at `url` into the local folder `target`, and check each
    arrived whole (its size as listed): a short read is an error, never a model."""
    fs, p = filesystem(url, storage)

    def fetch(file: RemoteFile) -> None:
        local = os.path.join(target, file.name)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fs.get_file(posixpath.join(p, file.name), local)
        got = os.path.getsize(local)
        if got != file.size:
            raise OSError(f"{_url(fs, posixpath.join(p, file.name))}: fetched {got} bytes "
                          f"of {file.size}")

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(fetch, files))


def put_folder(local: str, url: str, storage: StorageConfig) -> None:
    """Upload (or copy) every file under the local folder `local` to `url`."""
    fs, p = filesystem(url, storage)
    for root, _, names in os.walk(local):
        for name in names:
            source = os.path.join(root, name)
            dest = posixpath.join(p, os.path.relpath(source, local).replace(os.sep, "/"))
            if "s3" not in fs.protocol:
                fs.makedirs(posixpath.dirname(dest), exist_ok=True)
            fs.put_file(source, dest)
