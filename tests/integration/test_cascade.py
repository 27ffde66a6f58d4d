"""A cascade through Ray Data: a tiny Qwen2 classifier labels every row, and only the rows it
was unsure of go on to a tiny BERT classifier, each stage in its own actor pool. Checked row by
row against each model run alone on the same rows."""
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clsjob.config import ClassifyConfig, validate
from clsjob.run.pipeline import run_classify
from helpers import LABELS, KillOnceAtWork, kill_driver_after_first_shard, sample_texts, write_shards

SHARDS, ROWS = 3, 120


def rows_by_id(out) -> dict:
    table = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("*.parquet")))
    return {row["id"]: row for row in table.to_pylist()}


def shard(seed: int) -> dict:
    texts = sample_texts(ROWS, seed=seed)
    texts[5] = ""  # an error row at the first stage: never escalated
    rng = random.Random(seed)
    return {"text": texts, "gold": [rng.choice(LABELS) for _ in texts]}


@pytest.fixture(scope="module")
def alone(qwen_model, bert_model, ray_cluster, tmp_path_factory):
    """The input, and each model's own output over every row."""
    root = tmp_path_factory.mktemp("cascade")
    write_shards(root / "in", [shard(s) for s in range(SHARDS)])
    for name, model in (("small", qwen_model), ("large", bert_model)):
        run_classify(validate({"input": {"path": str(root / "in"), "label_column": "gold"},
                               "backend": {"model": str(model), "dtype": "float32"},
                               "output": {"path": str(root / name), "rows_per_part": 50}},
                              model=ClassifyConfig))
    return root, rows_by_id(root / "small"), rows_by_id(root / "large")


def cascade_config(root, out, qwen_model, bert_model, **rule) -> ClassifyConfig:
    return validate({
        "input": {"path": str(root / "in"), "label_column": "gold"},
        "backend": {"kind": "cascade", "stages": [
            {"name": "small", "backend": {"model": str(qwen_model), "dtype": "float32"}, **rule},
            {"name": "large", "backend": {"model": str(bert_model), "dtype": "float32"}}]},
        "output": {"path": str(out), "rows_per_part": 50}}, model=ClassifyConfig)


def test_only_the_unsure_rows_reach_the_second_stage(alone, qwen_model, bert_model, tmp_path):
    root, small, large = alone
    confidences = [r["confidence"] for r in small.values() if r["error"] is None]
    below = float(np.median(confidences))
    summary = run_classify(cascade_config(root, tmp_path / "out", qwen_model, bert_model,
                                          escalate_below=below))
    out = rows_by_id(tmp_path / "out")
    assert summary.rows_in == summary.rows_out == len(out) == SHARDS * ROWS
    sent = {i for i, r in small.items() if r["error"] is None and r["confidence"] < below}
    assert 0.3 < len(sent) / len(confidences) < 0.7
    for i, row in out.items():
        want = large[i] if i in sent else small[i]
        assert row["labelled_by"] == (("large" if i in sent else "small") if small[i]["error"] is None
                                      else None), i
        assert (row["label"], row["error"]) == (want["label"], want["error"]), i
        if row["probs"] is not None:
            np.testing.assert_allclose(row["probs"], want["probs"], atol=1e-5)
            assert row["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
    assert sum(r["error"] is not None for r in out.values()) == SHARDS  # the empty texts

    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    first, second = manifest["cascade"]["stages"]
    assert (first["name"], first["rows_ran"], first["rows_labelled"]) == (
        "small", len(confidences), len(confidences) - len(sent))
    assert (second["name"], second["rows_ran"], second["rows_labelled"]) == ("large", len(sent), len(sent))
    assert manifest["cascade"]["escalated_share"] == pytest.approx(len(sent) / len(confidences))
    assert first["busy_s"] > 0 and second["rows_per_busy_s"] > 0
    # The run's model seconds are both stages' (each row carries the sum of its stages').
    assert manifest["busy"]["model_s"] == pytest.approx(first["busy_s"] + second["busy_s"], abs=0.01)
    assert manifest["busy"]["cpus_per_actor"] is None  # each stage's own is in its entry
    # Accuracy of each stage on the rows it labelled, and of the first stage alone on all.
    for stage, rows in ((first, [i for i in out if i not in sent and small[i]["error"] is None]),
                        (second, sorted(sent))):
        assert stage["accuracy_on_its_rows"] == pytest.approx(
            np.mean([out[i]["label"] == out[i]["gold"] for i in rows]))
    alone_metrics = json.loads((root / "small" / "_metrics.json").read_text())
    assert manifest["cascade"]["first_stage_alone_accuracy"] == pytest.approx(alone_metrics["accuracy"])
    metrics = json.loads((tmp_path / "out" / "_metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(
        np.mean([r["label"] == r["gold"] for r in out.values() if r["error"] is None]))
    assert metrics["cascade"] == manifest["cascade"]
    assert "## Cascade" in (tmp_path / "out" / "report.md").read_text()


def test_a_margin_rule_escalates_by_the_gap_between_the_top_two(alone, qwen_model, bert_model, tmp_path):
    root, small, large = alone
    gaps = {i: np.diff(sorted(r["probs"])[-2:])[0] for i, r in small.items() if r["error"] is None}
    below = float(np.quantile(list(gaps.values()), 0.3))
    run_classify(cascade_config(root, tmp_path / "out", qwen_model, bert_model,
                                escalate_margin_below=below))
    out = rows_by_id(tmp_path / "out")
    assert {i for i, r in out.items() if r["labelled_by"] == "large"} == {
        i for i, gap in gaps.items() if gap < below}


def test_a_killed_second_stage_actor_loses_and_doubles_no_row(alone, qwen_model, bert_model, tmp_path):
    """The second stage's actor process is killed while it works (as the OOM killer would):
    Ray restarts it, Ray Data redoes its chunk, and every row comes out once."""
    root, small, _ = alone
    below = float(np.quantile([r["confidence"] for r in small.values() if r["error"] is None], 0.8))
    cfg = cascade_config(root, tmp_path / "out", qwen_model, bert_model, escalate_below=below)
    # One row per forward pass at the second stage: slow enough to be killed at work.
    second = cfg.backend.stages[1]
    second = second.model_copy(update={"backend": second.backend.model_copy(update={"micro_batch_size": 1})})
    cfg = cfg.model_copy(update={"backend": cfg.backend.model_copy(
        update={"stages": [cfg.backend.stages[0], second]})})
    with KillOnceAtWork("CascadeStage2") as killer:
        summary = run_classify(cfg)
    assert killer.killed, "no second-stage actor was killed: the test did not test anything"
    out = rows_by_id(tmp_path / "out")
    assert summary.rows_out == summary.rows_in == len(out) == SHARDS * ROWS
    escalated = {i for i, r in small.items() if r["error"] is None and r["confidence"] < below}
    assert {i for i, r in out.items() if r["labelled_by"] == "large"} == escalated
    assert sum(r["error"] is not None for r in out.values()) == SHARDS


def test_a_killed_driver_resumes_the_cascade(qwen_model, bert_model, ray_cluster, tmp_path):
    import yaml

    from clsjob.config import load_config
    from clsjob.contract import PROGRESS

    write_shards(tmp_path / "in", [shard(s) for s in range(8)])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"path": str(tmp_path / "in"), "label_column": "gold"},
        "backend": {"kind": "cascade", "stages": [
            {"name": "small", "backend": {"model": str(qwen_model), "micro_batch_size": 1,
                                          "dtype": "float32"}, "escalate_below": 0.5},
            {"name": "large", "backend": {"model": str(bert_model), "dtype": "float32"}}]},
        "output": {"path": str(tmp_path / "out"), "rows_per_part": 40}}))
    done_before = kill_driver_after_first_shard(config, tmp_path / "out", ray_cluster)
    progress = tmp_path / "out" / PROGRESS
    assert 0 < len(done_before) < 8

    summary = run_classify(load_config(config, model=ClassifyConfig))
    out = rows_by_id(tmp_path / "out")
    assert summary.rows_in == summary.rows_out == len(out) == 8 * ROWS
    for name, mtime in done_before.items():  # finished shards were not redone
        assert (progress / name).stat().st_mtime_ns == mtime, name
    # The per-stage counts add up over the shards of both attempts.
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    first, second = manifest["cascade"]["stages"]
    assert first["rows_ran"] == sum(r["error"] is None for r in out.values()) == 8 * (ROWS - 1)
    assert second["rows_ran"] == second["rows_labelled"] == sum(r["labelled_by"] == "large" for r in out.values())
    assert first["rows_labelled"] == sum(r["labelled_by"] == "small" for r in out.values())


def test_stages_that_disagree_on_the_labels_are_refused_before_any_row(qwen_model, tmp_path):
    from clsjob.backends import ModelError
    from tiny_models import build_bert_classifier

    other = build_bert_classifier(tmp_path / "other", ["spam", "ham", "eggs"])
    cfg = cascade_config(tmp_path, tmp_path / "out", qwen_model, other, escalate_below=0.5)
    with pytest.raises(ModelError) as refused:
        run_classify(cfg)
    assert str(refused.value) == (
        "backend.stages[1] (large): labels ['spam', 'ham', 'eggs'] differ from the first stage's "
        "['negative', 'neutral', 'positive']; every stage must give the same labels (they are "
        "spelled differently (['eggs', 'ham', 'spam'] against ['negative', 'neutral', 'positive']): "
        "a fine-tuned model's labels are its id2label, a prompted LLM's are `labels` — name them "
        "as the model does, and put the wording the LLM should see in their descriptions)")
    # The same names in another order: `labels` puts both stages in one.
    reordered = build_bert_classifier(tmp_path / "reordered", LABELS[::-1])
    cfg = cascade_config(tmp_path, tmp_path / "out", qwen_model, reordered, escalate_below=0.5)
    with pytest.raises(ModelError, match=r"\(set `labels` to fix their order\)$"):
        run_classify(cfg)
    from clsjob.backends import check_stages
    from clsjob.labels import LabelSet

    assert check_stages(cfg.stages(), LabelSet(tuple(LABELS)), cfg.storage).labels.names == tuple(LABELS)
    assert not (tmp_path / "out").exists()
