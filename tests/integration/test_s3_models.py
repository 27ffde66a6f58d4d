"""Models kept in S3 (moto's server on 127.0.0.1): fetched once per node into the model cache,
however many actors load them; fine-tuned from and written to S3; merged S3 to S3.

Requests go through tests/faulty_s3.py with no faults injected: it only counts what each
object is asked for, so "fetched once" is what the S3 endpoint saw, not what clsjob says."""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from clsjob import model_cache, store
from clsjob.config import ClassifyConfig, FinetuneConfig, MergeConfig, StorageConfig, validate
from clsjob.finetune.merge import merge
from clsjob.finetune.train import run_finetune
from clsjob.run.pipeline import run_classify
from faulty_s3 import FaultyS3
from helpers import check_output_contract, write_shards
# Fixtures are found by name in the module that uses them.
from s3_fixtures import BUCKET, SHARD_ROWS, S3, aws_env, ray_with_aws_env, s3  # noqa: F401
from tiny_models import build_qwen2_classifier

WEIGHTS = "model.safetensors"


def upload_folder(s3: S3, folder: Path, prefix: str) -> list[str]:
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(folder)}"
        s3.client.upload_file(str(path), BUCKET, key)
        keys.append(key)
    return keys


def gets(proxy: FaultyS3, key: str) -> int:
    return proxy.requests[("GET", f"/{BUCKET}/{key}")]


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def test_model_is_fetched_once_per_node_however_many_actors(s3, ray_with_aws_env, qwen_model,
                                                            tmp_path):
    keys = upload_folder(s3, qwen_model, "models/qwen")
    cache = tmp_path / "cache"
    with FaultyS3(s3.endpoint, every=None) as counting:
        cfg = validate({
            "input": {"path": f"s3://{BUCKET}/in/", "label_column": "label"},
            "backend": {"model": f"s3://{BUCKET}/models/qwen", "max_length": 64},
            # Three actors on this one node, with one row chunk each at least.
            "resources": {"actors": 3, "cpus_per_actor": 1},
            "output": {"path": str(tmp_path / "out"), "rows_per_part": 8},
            "storage": {"endpoint_url": counting.endpoint, "model_cache": str(cache)},
        }, model=ClassifyConfig)
        summary = run_classify(cfg)

    assert summary.rows_out == summary.rows_in == sum(SHARD_ROWS)
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["model"] == f"s3://{BUCKET}/models/qwen"
    # Every file of the model was fetched once for the node; config.json once more, by the
    # driver's check before the run (which reads no weights).
    for key in keys:
        assert gets(counting, key) == (2 if key.endswith("/config.json") else 1), key
    [entry] = cache_entries(cache)
    assert sorted(p.name for p in (cache / entry).iterdir()) == sorted(p.name for p in qwen_model.iterdir())
    assert (cache / entry / WEIGHTS).read_bytes() == (qwen_model / WEIGHTS).read_bytes()


def fetch_in_process(url: str, storage: dict) -> str:
    return model_cache.local_model(url, StorageConfig(**storage))


def test_processes_racing_for_one_model_fetch_it_once(s3, aws_env, qwen_model, tmp_path):
    keys = upload_folder(s3, qwen_model, "models/race")
    url = f"s3://{BUCKET}/models/race"
    with FaultyS3(s3.endpoint, every=None) as counting:
        storage = {"endpoint_url": counting.endpoint, "model_cache": str(tmp_path / "cache")}
        with multiprocessing.get_context("spawn").Pool(4) as pool:
            folders = pool.starmap(fetch_in_process, [(url, storage)] * 4)
    assert len(set(folders)) == 1
    assert all(gets(counting, key) == 1 for key in keys)


def test_a_cut_fetch_is_never_used_and_a_replaced_model_is_fetched_anew(s3, aws_env, qwen_model,
                                                                        tmp_path):
    upload_folder(s3, qwen_model, "models/changing")
    url = f"s3://{BUCKET}/models/changing"
    storage = StorageConfig(endpoint_url=s3.endpoint, model_cache=str(tmp_path / "cache"))
    files = store.list_folder(url, storage)
    # A fetch whose file arrives short fails naming it, and leaves no cache entry behind.
    short = [f if f.name != WEIGHTS else store.RemoteFile(f.name, f.size + 1, f.tag) for f in files]
    name = model_cache.entry_name(url, files)
    Path(storage.model_cache).mkdir()
    with pytest.raises(OSError, match=rf"{WEIGHTS}: fetched {(qwen_model / WEIGHTS).stat().st_size} bytes"):
        model_cache.fetch_entry(url, short, Path(storage.model_cache), name, storage)
    assert not list(Path(storage.model_cache).iterdir())
    # What a killed fetch leaves (a partial folder) is cleared by the next, never loaded.
    (Path(storage.model_cache) / f".{name}.dead.partial").mkdir()
    first = Path(model_cache.local_model(url, storage))
    assert first.name == name and cache_entries(first.parent) == [name]
    assert not list(first.parent.glob("*.partial"))
    # The model replaced in S3: a new entry, with the new content.
    s3.client.put_object(Bucket=BUCKET, Key="models/changing/config.json",
                         Body=(qwen_model / "config.json").read_bytes() + b"\n")
    second = Path(model_cache.local_model(url, storage))
    assert second != first and (second / "config.json").read_bytes().endswith(b"}\n\n")


def test_a_missing_s3_model_is_named_before_any_row(s3, ray_with_aws_env, tmp_path):
    cfg = validate({"input": {"path": f"s3://{BUCKET}/in/"},
                    "backend": {"model": f"s3://{BUCKET}/models/absent"},
                    "output": {"path": str(tmp_path / "out")},
                    "storage": {"endpoint_url": s3.endpoint, "model_cache": str(tmp_path / "c")}},
                   model=ClassifyConfig)
    with pytest.raises(ValueError, match=rf"backend.model: no model files under s3://{BUCKET}/models/absent"):
        run_classify(cfg)
    assert not (tmp_path / "out").exists()


def test_finetune_from_s3_to_s3_then_merge_and_classify_from_s3(s3, ray_with_aws_env, tmp_path):
    base = build_qwen2_classifier(tmp_path / "base", ["unused"], causal_lm=True)
    upload_folder(s3, base, "models/base")
    write_shards(tmp_path / "train", [{"text": [f"{w} order {i}" for i in range(24) for w in ("card", "parcel")],
                                       "label": [lab for _ in range(24) for lab in ("billing", "delivery")]}])
    storage = {"endpoint_url": s3.endpoint, "model_cache": str(tmp_path / "cache")}
    run_finetune(validate({
        "base_model": f"s3://{BUCKET}/models/base",
        "train": {"path": str(tmp_path / "train"), "label_column": "label"},
        "training": {"epochs": 1, "batch_size": 16, "max_length": 16, "lora_r": 4, "lora_alpha": 8,
                     # abstain.score: distance's index: 8 training rows a label, each row's
                     # distance to its nearest one. Plain LoRA: the merged model is then the
                     # one the index was built with (QLoRA's is its 4-bit twin).
                     "distance_index_rows": 16, "distance_k": 1, "quantization": "none"},
        "output": {"path": f"s3://{BUCKET}/models/adapter"},
        "storage": storage}, model=FinetuneConfig))
    adapter_keys = s3.client.list_objects_v2(Bucket=BUCKET, Prefix="models/adapter/")["Contents"]
    names = {o["Key"].removeprefix("models/adapter/") for o in adapter_keys}
    assert {"adapter_model.safetensors", "adapter_config.json", "clsjob_finetune.json",
            "clsjob_distance_index.npy", "clsjob_distance_gaussians.npz"} <= names
    assert json.loads(s3.read("models/adapter/clsjob_finetune.json"))["base_model"] == f"s3://{BUCKET}/models/base"

    merge(validate({"adapter": f"s3://{BUCKET}/models/adapter", "output": f"s3://{BUCKET}/models/merged",
                    "dtype": "float32", "storage": storage}, model=MergeConfig))
    merged = json.loads(s3.read("models/merged/config.json"))
    assert merged["architectures"] == ["Qwen2ForSequenceClassification"]
    assert set(merged["id2label"].values()) == {"billing", "delivery"}
    # No eval rows: an index but no threshold, which classify must then be given.
    assert merged["clsjob_distance"] == {"k": 1, "above": None, "rows": 16, "mahalanobis_above": None}
    for name in ("clsjob_distance_index.npy", "clsjob_distance_gaussians.npz"):
        assert s3.read(f"models/merged/{name}") == s3.read(f"models/adapter/{name}")

    summary = run_classify(validate({
        "input": {"path": str(tmp_path / "train")},
        "backend": {"model": f"s3://{BUCKET}/models/merged", "max_length": 16},
        "abstain": {"score": "distance", "above": 0.01, "label": "far"},
        "output": {"path": str(tmp_path / "out")}, "storage": storage}, model=ClassifyConfig))
    out = check_output_contract(summary, tmp_path / "out", rows=48, errored=0)
    scores = np.array([row["ood_score"] for row in out])
    # The 16 indexed training rows find themselves: the back end measures in the space the
    # fine-tune built the index in (float16 rows, a merged float32 model).
    assert (scores < 0.005).sum() >= 16 and scores.min() >= -1e-3
    assert [row["label"] == "far" for row in out] == list(scores > 0.01)
