"""The classify pipeline against a real S3 endpoint: moto's server on 127.0.0.1.

Input shards, output parts, the manifest and the evaluation all go through s3fs, in the driver
and in the Ray workers, exactly as on AWS; only the endpoint differs. The results are read
back with plain boto3, not through clsjob.store, so the check does not share the code it checks.
"""
from __future__ import annotations

import io as bytes_io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clsjob import store
from clsjob.config import ClassifyConfig, StorageConfig, validate
from clsjob.contract import LOCK
from clsjob.run.lock import RunLock, RunLocked
from clsjob.run.pipeline import run_classify
from faulty_s3 import FAULTS, FaultyS3
from helpers import LABELS, TEST_AWS_ENV as AWS_ENV
# Fixtures are found by name in the module that uses them.
from s3_fixtures import (BAD_TEXTS, BUCKET, SHARD_ROWS, S3, aws_env, ray_with_aws_env,  # noqa: F401
                         s3)


def classify_config(s3: S3, model) -> ClassifyConfig:
    return validate({
        "input": {"path": f"s3://{BUCKET}/in/", "text_column": "text", "label_column": "label"},
        "backend": {"kind": "hf", "model": str(model), "max_length": 64, "micro_batch_size": 8},
        "resources": {"actors": 1, "cpus_per_actor": 1},
        "output": {"path": f"s3://{BUCKET}/out/", "rows_per_part": 16},
        "storage": {"endpoint_url": s3.endpoint},
    }, model=ClassifyConfig)


def test_classify_s3_to_s3(s3, ray_with_aws_env, qwen_model):
    summary = run_classify(classify_config(s3, qwen_model))

    rows_in = sum(SHARD_ROWS)
    assert (summary.rows_in, summary.rows_out, summary.rows_errored) == (rows_in, rows_in, len(BAD_TEXTS))

    keys = s3.keys("out/")
    part_keys = [k for k in keys if k.endswith(".parquet")]
    assert {"out/_manifest.json", "out/_metrics.json", "out/report.md"} <= set(keys)
    table = pa.concat_tables(pq.read_table(bytes_io.BytesIO(s3.read(k))) for k in part_keys)
    rows = table.to_pylist()

    # Rows out = rows in, counted from what is in the bucket; every derived id exactly once.
    assert len(rows) == rows_in
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert set(ids) == {f"shard-{i:03d}.parquet:{j}" for i, n in enumerate(SHARD_ROWS) for j in range(n)}

    bad_ids = {f"shard-{i:03d}.parquet:{j}" for i, j in BAD_TEXTS}
    for r in rows:
        if r["id"] in bad_ids:
            assert r["error"] and r["label"] is None, r
        else:
            assert r["error"] is None and r["label"] in LABELS, r
            assert len(r["probs"]) == len(LABELS)
        assert r["gold"] in LABELS

    manifest = json.loads(s3.read("out/_manifest.json"))
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_errored"]) == (
        rows_in, rows_in, len(BAD_TEXTS))
    assert [s["path"] for s in manifest["shards"]] == [
        f"s3://{BUCKET}/in/shard-{i:03d}.parquet" for i in range(len(SHARD_ROWS))]
    assert sorted(f"out/{p['part']}" for p in manifest["parts"]) == part_keys
    assert sum(p["rows"] for p in manifest["parts"]) == rows_in

    metrics = json.loads(s3.read("out/_metrics.json"))
    assert (metrics["rows"], metrics["rows_errored"]) == (rows_in, len(BAD_TEXTS))

    # Credentials live only in the environment: no output file may carry them.
    for key in ("out/_manifest.json", "out/_metrics.json", "out/report.md"):
        text = s3.read(key).decode()
        assert AWS_ENV["AWS_SECRET_ACCESS_KEY"] not in text, key
        assert AWS_ENV["AWS_ACCESS_KEY_ID"] not in text, key


def test_glob_lists_the_same_shards_as_the_folder(s3):
    storage = StorageConfig(endpoint_url=s3.endpoint)
    expected = [f"s3://{BUCKET}/in/shard-{i:03d}.parquet" for i in range(len(SHARD_ROWS))]

    assert store.list_shards(f"s3://{BUCKET}/in/shard-00*.parquet", storage) == expected
    assert store.list_shards(f"s3://{BUCKET}/in/", storage) == expected  # _SUCCESS skipped
    assert store.list_shards(f"s3://{BUCKET}/in", storage) == expected


def test_transient_s3_errors_are_retried_on_read_and_write(s3, ray_with_aws_env, qwen_model):
    cfg = classify_config(s3, qwen_model)
    with FaultyS3(s3.endpoint, every=3) as faulty:
        flaky = cfg.model_copy(update={
            "storage": StorageConfig(endpoint_url=faulty.endpoint),
            "output": cfg.output.model_copy(update={"path": f"s3://{BUCKET}/out-flaky/"})})
        summary = run_classify(flaky)

    # Every third request of each method failed, in all three ways, on reads and on writes.
    assert faulty.injected_for("GET") >= 3 and faulty.injected_for("PUT") >= 3, faulty.injected
    assert {fault for _, fault in faulty.injected} == set(FAULTS)
    rows_in = sum(SHARD_ROWS)
    assert summary.rows_in == summary.rows_out == rows_in
    parts = [k for k in s3.keys("out-flaky/") if k.endswith(".parquet")]
    ids = pa.concat_tables(pq.read_table(bytes_io.BytesIO(s3.read(k))) for k in parts).column("id")
    assert len(ids) == len(set(ids.to_pylist())) == rows_in
    assert json.loads(s3.read("out-flaky/_manifest.json"))["status"] == "complete"


def test_without_retries_the_same_faults_fail_the_run(s3, ray_with_aws_env, qwen_model):
    # The control for the test above: it is the retries that carry the run through. And a
    # read that fails for good is the storage's fault, not the file's: even with
    # on_bad_file: skip, the file is not skipped as corrupt, the run fails.
    cfg = classify_config(s3, qwen_model)
    with FaultyS3(s3.endpoint, every=3) as faulty:
        once = cfg.model_copy(update={
            "input": cfg.input.model_copy(update={"on_bad_file": "skip"}),
            "storage": StorageConfig(endpoint_url=faulty.endpoint, max_attempts=1),
            "output": cfg.output.model_copy(update={"path": f"s3://{BUCKET}/out-once/"})})
        with pytest.raises(OSError) as failed:
            run_classify(once)
    assert sum(faulty.injected.values()) >= 1
    assert "not a readable Parquet file" not in str(failed.value)
    assert "out-once/_manifest.json" not in s3.keys("out-once/")


def test_run_lock_on_s3_is_exclusive(s3):
    # S3's conditional PUT (If-None-Match: *) makes the second create fail, not overwrite.
    storage = StorageConfig(endpoint_url=s3.endpoint)
    with RunLock(f"s3://{BUCKET}/locked/", storage, stale_after_s=600) as first:
        assert json.loads(s3.read(f"locked/{LOCK}"))["owner"] == first.owner
        with pytest.raises(RunLocked, match="another run holds this output"):
            with RunLock(f"s3://{BUCKET}/locked/", storage, stale_after_s=600):
                pass
        assert json.loads(s3.read(f"locked/{LOCK}"))["owner"] == first.owner
    assert f"locked/{LOCK}" not in s3.keys("locked/")
