"""A driver killed mid-run and started again finishes the work without redoing finished
shards and without losing or doubling a row."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from clsjob.config import ClassifyConfig, load_config
from clsjob.contract import PROGRESS
from clsjob.run.pipeline import run_classify
from helpers import kill_driver_after_first_shard, sample_texts, write_shards

SHARDS, ROWS = 8, 240


def test_killed_driver_resumes_where_it_stopped(qwen_model, ray_cluster, tmp_path):
    write_shards(tmp_path / "in", [{"text": sample_texts(ROWS, seed=s)} for s in range(SHARDS)])
    config = tmp_path / "c.yaml"
    # One row per forward pass and small parts: slow enough to be killed half way.
    config.write_text(yaml.safe_dump({
        "input": {"path": str(tmp_path / "in")},
        "backend": {"model": str(qwen_model), "micro_batch_size": 1},
        "resources": {"batch_size": 40},
        "output": {"path": str(tmp_path / "out")}}))
    done_before = kill_driver_after_first_shard(config, tmp_path / "out", ray_cluster)
    progress = tmp_path / "out" / PROGRESS
    assert 0 < len(done_before) < SHARDS
    assert not (tmp_path / "out" / "_manifest.json").exists()
    finished_parts = {part["part"]: (tmp_path / "out" / part["part"]).stat().st_mtime_ns
                      for marker in progress.glob("*.json")
                      for part in json.loads(marker.read_text())["parts"]}

    summary = run_classify(load_config(config, model=ClassifyConfig))

    assert summary.rows_in == summary.rows_out == SHARDS * ROWS
    table = pa.concat_tables(pq.read_table(p) for p in (tmp_path / "out").glob("*.parquet"))
    ids = table.column("id").to_pylist()
    assert len(ids) == SHARDS * ROWS and len(set(ids)) == len(ids)
    # Shards finished before the kill were skipped: neither their parts nor markers rewritten.
    for name, mtime in finished_parts.items():
        assert (tmp_path / "out" / name).stat().st_mtime_ns == mtime, name
    for name, mtime in done_before.items():
        assert (progress / name).stat().st_mtime_ns == mtime, name
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and all(s["done"] for s in manifest["shards"])
    assert summary.rows_per_s > 0
