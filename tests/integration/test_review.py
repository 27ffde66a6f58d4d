"""Rows for review end to end: the picked rows equal a full sort of the written output, and a
resumed run (one shard done before, from its marker) picks the same rows."""
import json

import numpy as np
import pyarrow.parquet as pq

from clsjob.config import ClassifyConfig, StorageConfig, validate
from clsjob.evaluation.review import uncertainty
from clsjob.run.pipeline import run_classify
from clsjob.run.resume import marker_url
from clsjob.store import list_parts, read_table
from helpers import LABELS, sample_texts, write_shards


def config(model, inp, out, **review):
    return validate({
        "input": {"path": str(inp), "label_column": "label"}, "output": {
            "path": str(out), "rows_per_part": 40, "keep_text": False,
            "review": {"rows": 12, "strategy": "margin", **review}},
        "backend": {"model": str(model), "max_length": 64, "dtype": "float32"}}, model=ClassifyConfig)


def full_sort(out, n):
    rows = [r for p in list_parts(str(out), StorageConfig())
            for r in read_table(p, StorageConfig()).to_pylist() if r["probs"] is not None]
    scores = uncertainty(np.array([r["probs"] for r in rows]), "margin")
    return [rows[i]["id"] for i in sorted(range(len(rows)), key=lambda i: (-scores[i], rows[i]["id"]))[:n]]


def test_review_rows_equal_a_full_sort_and_survive_a_resume(qwen_model, ray_cluster, tmp_path):
    texts = [sample_texts(100, seed=s) for s in range(3)]
    texts[0][3] = ""  # an errored row has nothing to rank
    write_shards(tmp_path / "in", [{"text": t, "label": [LABELS[i % 3] for i in range(100)]} for t in texts])
    out = tmp_path / "out"
    run_classify(config(qwen_model, tmp_path / "in", out))
    review = pq.read_table(out / "_review" / "review.parquet")
    assert review.column("id").to_pylist() == full_sort(out, 12)
    assert review.column("rank").to_pylist() == list(range(1, 13))
    assert {"text", "label", "confidence", "probs", "gold", "score"} <= set(review.column_names)
    assert all(t for t in review.column("text").to_pylist())  # the text, though the output drops it
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["review"] == {"path": "_review/review.parquet", "rows": 12, "fraction": None,
                                  "strategy": "margin", "per_label": False}
    assert len(list_parts(str(out), StorageConfig())) == 9  # the review file is not a part

    # An attempt that got one shard done: its marker and parts stay, the rest is gone.
    shards = [s["key"] for s in manifest["shards"]]
    (out / "_manifest.json").unlink()
    (out / "_review" / "review.parquet").unlink()
    for key in shards[1:]:
        (out / marker_url("", key).lstrip("/")).unlink()
    kept = {}
    for part in manifest["parts"]:
        if part["part"].startswith(shards[0].removesuffix(".parquet").replace("/", "__")):
            kept[part["part"]] = (out / part["part"]).stat().st_mtime_ns
        else:
            (out / part["part"]).unlink()
    run_classify(config(qwen_model, tmp_path / "in", out))
    assert kept and all((out / p).stat().st_mtime_ns == t for p, t in kept.items())  # not redone
    assert pq.read_table(out / "_review" / "review.parquet").column("id").to_pylist() == \
        review.column("id").to_pylist()
