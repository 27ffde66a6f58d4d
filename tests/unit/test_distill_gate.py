"""distill's gate against the corpus's gold labels where the teacher (an LLM told its labels)
spells them otherwise than the corpus does: scored on the rows it can be, never a silent 0."""
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clsjob.config import DistillConfig, validate
from clsjob.contract import GOLD, MANIFEST
from clsjob.distill import CORPUS_GOLD, check_gold_spelling, judge_gate
from clsjob.store import InputError


def distill_config(run, labels, min_accuracy=None) -> DistillConfig:
    return validate({
        "input": {"path": "unused", "label_column": "sentiment"}, "labels": labels,
        "teacher": {"backend": {"kind": "vllm_prompt", "model": "unused"}},
        "student": {"base_model": "unused"}, "sample": {"rows": 10},
        "gate": {"min_agreement": 0.5, "min_accuracy": min_accuracy, "cascade_agreement": 0.9},
        "output": {"path": str(run)}}, model=DistillConfig)


def write_run(folder, table: pa.Table, **manifest) -> None:
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-0.parquet")
    (folder / MANIFEST).write_text(json.dumps({"parts": [{"part": "part-0.parquet"}], **manifest}))


@pytest.fixture
def heldout(tmp_path):
    """Six held-out rows: the student's label and confidence, the teacher's label (as the run's
    gold) and the corpus's own gold, spelled in lower case where the teacher says Positive."""
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / MANIFEST).write_text(json.dumps({"labels": ["Negative", "Positive"]}))
    write_run(tmp_path / "heldout", pa.table({
        "label": ["Positive", "Positive", "Negative", "Negative", "Positive", "Negative"],
        "confidence": [0.9, 0.6, 0.95, 0.7, 0.8, 0.55],
        GOLD: ["Positive", "Negative", "Negative", "Negative", "Positive", "Positive"],
        CORPUS_GOLD: ["Positive", "positive", "Negative", None, "Positive", "Positive"]}))
    return tmp_path


def test_accuracy_is_scored_only_where_the_gold_is_spelled_as_a_label(heldout):
    gate = judge_gate(distill_config(heldout, ["Negative", "Positive"], min_accuracy=0.7))
    assert gate["agreement"] == pytest.approx(4 / 6)
    # Rows 0, 2, 4, 5 have a gold label of the set: the student is right on 0, 2, 4, the
    # teacher on all four.
    assert gate["accuracy"] == pytest.approx(3 / 4) and gate["teacher_accuracy"] == 1.0
    assert gate["gold_outside_labels"] == {"positive": 1}
    assert gate["passed"]


def test_no_gold_of_the_set_misses_a_min_accuracy_gate_and_says_why(heldout, tmp_path_factory):
    run = tmp_path_factory.mktemp("lower")
    (run / "teacher").mkdir()
    (run / "teacher" / MANIFEST).write_text(json.dumps({"labels": ["Negative", "Positive"]}))
    write_run(run / "heldout", pa.table({"label": ["Positive", "Negative"], "confidence": [0.9, 0.8],
                                         GOLD: ["Positive", "Negative"],
                                         CORPUS_GOLD: ["positive", "negative"]}))
    gate = judge_gate(distill_config(run, ["Negative", "Positive"], min_accuracy=0.5))
    assert gate["accuracy"] is None and not gate["passed"]
    assert gate["why"] == ("accuracy cannot be judged: no held-out row's gold label (sentiment) is "
                           "one of the teacher's labels ['Negative', 'Positive'] (the corpus has "
                           "['negative', 'positive'])")
    # Without min_accuracy the gate is agreement alone.
    assert judge_gate(distill_config(run, ["Negative", "Positive"]))["passed"]


def test_the_sample_gold_spelled_otherwise_is_refused_before_the_teacher_runs(tmp_path, caplog):
    sample = tmp_path / "sample"
    sample.mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["x", "y", "z"],
                             GOLD: ["negative", "positive", None]}), sample / "sample-00000.parquet")
    (sample / MANIFEST).write_text(json.dumps({"status": "complete", "files": ["sample-00000.parquet"]}))
    with pytest.raises(InputError) as refused:
        check_gold_spelling(distill_config(tmp_path, ["Negative", "Positive"]))
    assert str(refused.value) == ("input.label_column sentiment: none of the sample's gold labels "
                                  "['negative', 'positive'] is one of labels ['Negative', 'Positive']; "
                                  "spell the labels as the corpus does, or leave input.label_column out")
    with caplog.at_level(logging.WARNING, logger="clsjob"):
        check_gold_spelling(distill_config(tmp_path, ["Negative", "positive"]))
    assert "1 sample rows have a gold label outside labels ['Negative', 'positive'] (['negative'])" in caplog.text


def test_the_corpus_cascade_leaves_unset_stage_resources_to_the_run(tmp_path):
    from clsjob.distill import corpus_cascade

    cfg = distill_config(tmp_path, ["Negative", "Positive"])
    stages = corpus_cascade(cfg, 0.8).stages
    assert [s.name for s in stages] == ["student", "teacher"] and stages[0].escalate_below == 0.8
    assert all("resources" not in s.model_fields_set for s in stages)  # sized by the run
    sized = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={
        "resources": cfg.teacher.resources.model_copy(update={"cpus_per_actor": 3.0})})})
    stages = corpus_cascade(sized, 0.8).stages
    assert "resources" not in stages[0].model_fields_set and stages[1].resources.cpus_per_actor == 3.0


def test_the_corpus_cascade_is_split_by_cpu_seconds_not_by_seconds(tmp_path):
    """A teacher sampled on 8 CPUs at 0.1 s a row costs 0.8 CPU seconds a row, not 0.1: the
    split of a CPU node between the stages must not take it for a cheap model."""
    from clsjob.distill import stage_work
    from clsjob.run.placement import split_by_work

    cfg = distill_config(tmp_path, ["Negative", "Positive"])
    for folder, model_s, cpus in (("heldout", 2.0, 1.0), ("teacher", 40.0, 8.0)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / MANIFEST).write_text(json.dumps(
            {"rows_out": 400, "busy": {"model_s": model_s, "share": 0.9, "cpus_per_actor": cpus}}))
    work = stage_work(cfg, share=0.25)
    assert work == pytest.approx([2.0 / 400, 40.0 * 8 / 400 * 0.25])
    assert split_by_work(15, work) == [1, 14]  # by plain seconds: [2, 13]
    # Manifests written before cpus_per_actor was recorded: plain seconds, as they were read then.
    for folder in ("heldout", "teacher"):
        manifest = json.loads((tmp_path / folder / MANIFEST).read_text())
        del manifest["busy"]["cpus_per_actor"]
        (tmp_path / folder / MANIFEST).write_text(json.dumps(manifest))
    assert stage_work(cfg, share=0.25) == pytest.approx([2.0 / 400, 40.0 / 400 * 0.25])
