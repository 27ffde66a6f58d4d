"""run_classify end to end through a local Ray cluster with tiny models built by the tests."""
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clsjob import store
from clsjob.config import ClassifyConfig, StorageConfig, validate
from clsjob.evaluation.report import evaluate_output
from clsjob.labels import LabelError
from clsjob.precision import resolve_dtype
from clsjob.run import resume
from clsjob.run.pipeline import run_classify
from clsjob.store import InputError
from helpers import LABELS, sample_texts, write_shards

BAD_TEXTS = [None, "", "   \n"]


def corpus(tmp_path, shards=3, rows=150):
    """Shards with gold labels (some outside the label set), bad rows, and a carried column."""
    tables = []
    for s in range(shards):
        texts = sample_texts(rows, seed=s) + BAD_TEXTS
        texts[7] = "the film was a delight " * 100  # far over max_length 256: cut and flagged
        gold = [LABELS[i % 3] for i in range(rows)] + ["positive"] * 3
        gold[5] = "sarcastic"  # outside the label set: counted, not a crash
        raw = [t.encode() if t is not None else None for t in texts]
        raw[9] = b"a gripping \xff\xfe story"  # invalid UTF-8 in a string column
        raw[11] = b"great\x07 film\x00"  # control characters
        tables.append({"text": pa.array(raw, pa.binary()).view(pa.string()), "label": gold, "lang": ["en"] * len(texts),
                       "unused_blob": ["x" * 100] * len(texts)})
    write_shards(tmp_path / "in", tables)
    return tmp_path / "in", shards * (rows + len(BAD_TEXTS))


def config(model, inp, out, **extra) -> ClassifyConfig:
    data = {"input": {"path": str(inp), "label_column": "label", "carry_columns": ["lang"]},
            "backend": {"model": str(model), "max_length": 256},
            "resources": {"actors": 1},
            "output": {"path": str(out), "rows_per_part": 64}}
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value}
    return validate(data, model=ClassifyConfig)


def read_output(out) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in store.list_parts(str(out), StorageConfig()))


@pytest.mark.parametrize("model_fixture", ["qwen_model", "bert_model"])
def test_every_row_comes_out_once_with_the_output_contract(model_fixture, request, ray_cluster, tmp_path):
    inp, rows_in = corpus(tmp_path)
    out = tmp_path / "out"
    summary = run_classify(config(request.getfixturevalue(model_fixture), inp, out,
                                  evaluate={"target_accuracy": 0.01}))

    table = read_output(out)
    assert summary.rows_in == summary.rows_out == table.num_rows == rows_in
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert table.column_names == ["id", "text", "gold", "lang", "label", "confidence", "probs",
                                  "truncated", "error"]
    assert "unused_blob" not in table.column_names
    rows = table.to_pylist()
    bad = [r for r in rows if r["text"] is None or not r["text"].strip()]
    assert len(bad) == 9 and summary.rows_errored == 9
    assert all(r["error"] and r["label"] is None and r["probs"] is None for r in bad)
    good = [r for r in rows if r["error"] is None]
    assert all(r["label"] in LABELS and abs(sum(r["probs"]) - 1) < 1e-4 for r in good)
    assert all(r["confidence"] == pytest.approx(max(r["probs"])) for r in good)
    assert [r["id"] for r in good if r["truncated"]] == [f"shard-00{s}.parquet:7" for s in range(3)]
    assert all(r["truncated"] is None for r in bad)
    by_id = {r["id"]: r for r in rows}
    assert by_id["shard-001.parquet:9"]["text"] == "a gripping \ufffd\ufffd story"
    assert by_id["shard-001.parquet:11"]["text"] == "great  film "
    assert by_id["shard-001.parquet:9"]["label"] in LABELS

    # Parts are named after their shard and first row, and hold exactly those rows.
    parts = sorted(p.name for p in out.glob("*.parquet"))
    assert parts[:3] == ["shard-000-0000000000.parquet", "shard-000-0000000064.parquet",
                         "shard-000-0000000128.parquet"]
    assert len(parts) == 9
    first = pq.read_table(out / parts[1]).column("id").to_pylist()
    assert first == [f"shard-000.parquet:{i}" for i in range(64, 128)]

    manifest = json.loads((out / "_manifest.json").read_text())
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_errored"]) == (rows_in, rows_in, 9)
    assert manifest["rows_truncated"] == 3 and manifest["rows_cleaned"] == 6
    assert manifest["labels"] == LABELS and len(manifest["shards"]) == 3
    assert sum(p["rows"] for p in manifest["parts"]) == rows_in
    # backend.dtype is auto: what this CPU multiplies natively, recorded for every part.
    assert manifest["dtypes"] == [resolve_dtype("auto", "cpu")]
    assert {p["dtype"] for p in manifest["parts"]} == {resolve_dtype("auto", "cpu")}
    # The model's seconds, summed from the parts: some, and less than the actors' time.
    assert 0 < manifest["busy"]["model_s"] and 0 < manifest["busy"]["share"] < 1
    assert manifest["busy"]["cpus_per_actor"] == 1.0  # what those seconds ran on (the default)

    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["rows"] == rows_in and metrics["rows_errored"] == 9
    assert metrics["gold_outside_labels"] == 3 and metrics["gold_outside_labels_values"] == {"sarcastic": 3}
    scored = [r for r in good if r["gold"] in LABELS]
    assert metrics["rows_scored"] == len(scored)
    assert metrics["accuracy"] == pytest.approx(
        sum(r["gold"] == r["label"] for r in scored) / len(scored))
    # Accuracy against coverage, added up from the parts' counts, as a count over the output.
    coverage = metrics["coverage"]
    assert coverage["rows_scored"] == len(scored)
    for entry in coverage["thresholds"]:
        kept = [r for r in scored if r["confidence"] >= entry["threshold"]]
        assert entry["rows"] == len(kept)
        assert entry["accuracy"] == (pytest.approx(sum(r["gold"] == r["label"] for r in kept) / len(kept))
                                     if kept else None)
    # A target every row already reaches (the tiny model is right on some rows): no threshold.
    assert coverage["target"] == {"threshold": 0.0, "coverage": 1.0, "rows": len(scored),
                                  "accuracy": pytest.approx(metrics["accuracy"])}
    assert "Confusion matrix" in (out / "report.md").read_text()


def test_evaluate_recomputes_the_same_metrics(qwen_model, ray_cluster, tmp_path):
    inp, _ = corpus(tmp_path, shards=2, rows=60)
    out = tmp_path / "out"
    first = run_classify(config(qwen_model, inp, out)).metrics
    (out / "_metrics.json").unlink()
    again = evaluate_output(str(out), StorageConfig())
    assert again["confusion_matrix"] == first["confusion_matrix"]
    assert again["coverage"] == first["coverage"]  # the same counts, from the parts themselves
    assert again["expected_calibration_error"] == pytest.approx(first["expected_calibration_error"])
    assert json.loads((out / "_metrics.json").read_text())["accuracy"] == pytest.approx(first["accuracy"])


def test_rerun_gives_the_same_rows_and_ids(qwen_model, ray_cluster, tmp_path):
    inp, _ = corpus(tmp_path, shards=2, rows=40)
    a = read_output_of(run_classify(config(qwen_model, inp, tmp_path / "a")))
    # Two actors, each on one chunk at a time (not the default two): the same rows.
    b = read_output_of(run_classify(config(qwen_model, inp, tmp_path / "b",
                                           resources={"actors": 2, "calls_per_actor": 1})))
    assert a.sort_by("id").to_pylist() == b.sort_by("id").to_pylist()


def test_parts_sharing_a_call_are_written_as_the_same_parts(qwen_model, ray_cluster, tmp_path):
    """output.parts_per_call 3: one call sorts three parts' rows by length together, yet each
    part is written under its own name with its own rows, labelled as alone."""
    inp, rows_in = corpus(tmp_path, shards=2, rows=40)
    alone = run_classify(config(qwen_model, inp, tmp_path / "a", output={"rows_per_part": 16}))
    shared = run_classify(config(qwen_model, inp, tmp_path / "b",
                                 output={"rows_per_part": 16, "parts_per_call": 3}))
    assert shared.rows_out == alone.rows_out == rows_in
    names = sorted(p.name for p in (tmp_path / "a").glob("*.parquet"))
    assert len(names) == 6 and names == sorted(p.name for p in (tmp_path / "b").glob("*.parquet"))
    for name in names:
        a, b = pq.read_table(tmp_path / "a" / name), pq.read_table(tmp_path / "b" / name)
        assert a.column("id").to_pylist() == b.column("id").to_pylist()
        assert a.column("label").to_pylist() == b.column("label").to_pylist()
        a_probs, b_probs = a.column("probs").to_pylist(), b.column("probs").to_pylist()
        assert [p is None for p in a_probs] == [p is None for p in b_probs]
        for x, y in zip(a_probs, b_probs):  # other micro-batches: the same up to float error
            assert x is None or y == pytest.approx(x, abs=1e-5)


def test_an_autoscaling_actor_pool_labels_every_row(qwen_model, ray_cluster, tmp_path):
    inp, rows_in = corpus(tmp_path, shards=2, rows=40)
    summary = run_classify(config(qwen_model, inp, tmp_path / "out", resources={"actors": [1, 2]},
                                  output={"rows_per_part": 16}))
    assert summary.rows_in == summary.rows_out == rows_in
    assert len(read_output_of(summary).column("id").unique()) == rows_in


def test_finished_run_is_not_redone_unless_overwritten(qwen_model, ray_cluster, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="clsjob")
    inp, rows_in = corpus(tmp_path, shards=2, rows=40)
    cfg = config(qwen_model, inp, tmp_path / "out")
    first = run_classify(cfg)
    parts = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.parquet")}
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and all(s["done"] for s in manifest["shards"])

    # Same work with more actors: nothing to do, says so, and reports the finished run.
    again = run_classify(config(qwen_model, inp, tmp_path / "out", resources={"actors": 2}))
    assert "nothing to do" in caplog.text
    assert (again.rows_in, again.rows_out) == (rows_in, rows_in)
    assert again.metrics["accuracy"] == first.metrics["accuracy"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.parquet")} == parts

    # A different config may not mix its rows into this output...
    with pytest.raises(resume.OutputConflict, match="another config"):
        run_classify(config(qwen_model, inp, tmp_path / "out", output={"keep_text": False}))
    # ...unless asked to replace it: then every part is rewritten once, without the text.
    (tmp_path / "out" / "stray.parquet").write_bytes(b"not a part of this run")
    run_classify(config(qwen_model, inp, tmp_path / "out", output={"keep_text": False, "overwrite": True}))
    table = read_output(tmp_path / "out")
    assert table.num_rows == rows_in and len(set(table.column("id").to_pylist())) == rows_in
    assert "text" not in table.column_names
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == sorted(parts)


def test_evaluate_reads_only_the_manifests_parts(qwen_model, ray_cluster, tmp_path):
    inp, rows_in = corpus(tmp_path, shards=1, rows=30)
    run_classify(config(qwen_model, inp, tmp_path / "out"))
    (tmp_path / "out" / "stray.parquet").write_bytes(b"junk")
    assert evaluate_output(str(tmp_path / "out"), StorageConfig())["rows"] == rows_in


def read_output_of(summary):
    return read_output(summary.output)


def test_label_mismatch_fails_before_reading_any_row(qwen_model, ray_cluster, tmp_path):
    # The input path does not even exist: the label check must come first.
    cfg = validate({"input": {"path": str(tmp_path / "missing")}, "labels": ["spam", "ham"],
                    "backend": {"model": str(qwen_model)}, "output": {"path": str(tmp_path / "o")}},
                   model=ClassifyConfig)
    with pytest.raises(LabelError, match="do not match the model"):
        run_classify(cfg)
    assert not (tmp_path / "o").exists()


def test_missing_text_column_names_column_and_file(qwen_model, ray_cluster, tmp_path):
    write_shards(tmp_path / "in", [{"text": ["a"]}, {"body": ["b"]}])
    cfg = config(qwen_model, tmp_path / "in", tmp_path / "o",
                 input={"label_column": None, "carry_columns": []})
    with pytest.raises(InputError, match=r"shard-001\.parquet: input\.text_column 'text' is not a column"):
        run_classify(cfg)


def test_unreadable_files_fail_the_run_or_are_skipped_and_listed(qwen_model, ray_cluster, tmp_path):
    inp, _ = corpus(tmp_path, shards=2, rows=20)
    rows_good = 2 * (20 + len(BAD_TEXTS))
    (inp / "empty.parquet").write_bytes(b"")
    whole = (inp / "shard-000.parquet").read_bytes()
    (inp / "truncated.parquet").write_bytes(whole[: len(whole) // 2])

    with pytest.raises(InputError, match=r"empty\.parquet: not a readable Parquet file"):
        run_classify(config(qwen_model, inp, tmp_path / "o1"))
    assert not (tmp_path / "o1").exists()

    summary = run_classify(config(qwen_model, inp, tmp_path / "o2", input={"on_bad_file": "skip"}))
    assert summary.rows_in == summary.rows_out == read_output(tmp_path / "o2").num_rows == rows_good
    manifest = json.loads((tmp_path / "o2" / "_manifest.json").read_text())
    skipped = sorted(e.split(":")[0].rsplit("/", 1)[-1] for e in manifest["skipped_files"])
    assert skipped == ["empty.parquet", "truncated.parquet"]
    assert manifest["status"] == "complete"


def test_duplicate_ids_are_reported_or_refused(qwen_model, ray_cluster, tmp_path):
    # Ids repeat within a shard (7) and across shards (3 in both, 12 three times); null too.
    write_shards(tmp_path / "in", [
        {"doc": [1, 2, 3, 7, 7, None], "text": sample_texts(6, seed=0)},
        {"doc": [3, 12, 12, 12, 20, None], "text": sample_texts(6, seed=1)}])
    cfg = config(qwen_model, tmp_path / "in", tmp_path / "o",
                 input={"id_column": "doc", "label_column": None, "carry_columns": []})

    summary = run_classify(cfg)
    assert summary.rows_in == summary.rows_out == 12  # every row is still labelled
    assert sorted(read_output(tmp_path / "o").column("doc").to_pylist(), key=str) == sorted(
        [1, 2, 3, 3, 7, 7, 12, 12, 12, 20, None, None], key=str)
    found = json.loads((tmp_path / "o" / "_manifest.json").read_text())["duplicate_ids"]
    assert (found["ids"], found["rows"]) == (4, 9)
    assert found["examples"][0] == {"id": "12", "rows": 3}
    assert sorted(e["id"] for e in found["examples"]) == ["12", "3", "7", "None"]

    refuse = config(qwen_model, tmp_path / "in", tmp_path / "o2",
                    input={"id_column": "doc", "label_column": None, "carry_columns": [],
                           "on_duplicate_ids": "fail"})
    with pytest.raises(InputError, match=r"input.id_column 'doc': 4 ids occur more than once, "
                                         r"on 9 rows \(e\.g\. '12' ×3"):
        run_classify(refuse)
    assert not list((tmp_path / "o2").glob("*.parquet"))


def test_unique_ids_report_no_duplicates(qwen_model, ray_cluster, tmp_path):
    write_shards(tmp_path / "in", [{"doc": ["a", "b"], "text": sample_texts(2)},
                                   {"doc": ["c", "d"], "text": sample_texts(2, seed=3)}])
    cfg = config(qwen_model, tmp_path / "in", tmp_path / "o",
                 input={"id_column": "doc", "label_column": None, "carry_columns": []})
    run_classify(cfg)
    manifest = json.loads((tmp_path / "o" / "_manifest.json").read_text())
    assert manifest["duplicate_ids"] == {"ids": 0, "rows": 0, "examples": []}
    derived = run_classify(config(qwen_model, tmp_path / "in", tmp_path / "o2",
                                  input={"label_column": None, "carry_columns": []}))
    assert derived.rows_out == 4
    assert json.loads((tmp_path / "o2" / "_manifest.json").read_text())["duplicate_ids"] is None


def test_chunks_stay_whole_without_changing_the_process_setting(qwen_model, ray_cluster, tmp_path):
    """A part is one whole chunk even where Ray Data would split blocks by size (here a 1 KiB
    limit against chunks of ~20 KiB), and the job changes no other dataset's setting."""
    import ray

    context = ray.data.DataContext.get_current()
    before = context.target_max_block_size
    context.target_max_block_size = 1024
    try:
        inp, rows = corpus(tmp_path, shards=1, rows=100)
        summary = run_classify(config(qwen_model, inp, tmp_path / "out"))
        assert context.target_max_block_size == 1024
    finally:
        context.target_max_block_size = before
    assert summary.rows_out == rows == 103
    assert read_output(tmp_path / "out").num_rows == rows
