"""`clsjob distill` end to end on tiny models: a teacher (a tiny classifier, standing in for
the LLM) labels a sample, a tiny student is fine-tuned on its labels through Ray Train, a gate
that is missed stops with exit 2, and a rerun with a gate the student meets resumes after the
last finished step and labels the corpus through a student -> teacher cascade."""
import contextlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from clsjob.cli import main
from clsjob.contract import PROGRESS
from helpers import LABELS, sample_texts, write_shards
from tiny_models import build_qwen2_classifier

ROWS = 150


@pytest.fixture(scope="module")
def distilled(qwen_model, ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    base = build_qwen2_classifier(root / "base", ["unused"], causal_lm=True)
    write_shards(root / "corpus", [{"text": sample_texts(ROWS, seed=s),
                                    "gold": [LABELS[(i + s) % 3] for i in range(ROWS)]} for s in range(2)])
    config = {
        "input": {"path": str(root / "corpus"), "label_column": "gold"},
        "teacher": {"backend": {"model": str(qwen_model), "dtype": "float32", "max_length": 48}},
        "student": {"base_model": str(base),
                    "training": {"method": "full", "epochs": 2, "learning_rate": 3e-3, "batch_size": 16,
                                 "max_length": 48, "gradient_checkpointing": False}},
        "sample": {"rows": 120, "seed": 3, "heldout_fraction": 0.25, "rows_per_shard": 50},
        "gate": {"min_agreement": 0.999, "cascade_agreement": 0.9},
        "output": {"path": str(root / "run")}}
    (root / "missed.yaml").write_text(yaml.safe_dump(config))
    with contextlib.redirect_stderr(io.StringIO()) as said_missed:
        code_missed = main(["distill", "--config", str(root / "missed.yaml")])
    missed_gate = json.loads((root / "run" / "gate.json").read_text())
    after_miss = {p.relative_to(root / "run").as_posix(): p.stat().st_mtime_ns
                  for p in (root / "run").rglob("*") if p.is_file()}
    config["gate"]["min_agreement"] = 0.05
    config["label_corpus"] = True
    (root / "passed.yaml").write_text(yaml.safe_dump(config))
    code_passed = main(["distill", "--config", str(root / "passed.yaml")])
    # Another sample into the same run folder: refused, not silently skipped as done.
    config["sample"]["rows"] = 100
    (root / "other.yaml").write_text(yaml.safe_dump(config))
    with contextlib.redirect_stderr(io.StringIO()) as said:
        code_other = main(["distill", "--config", str(root / "other.yaml")])
    return root, (code_missed, said_missed.getvalue(), missed_gate), after_miss, (
        code_passed, (code_other, said.getvalue()))


def test_the_sample_teacher_split_and_student_are_each_a_step_in_the_run_folder(distilled):
    root, _, _, _ = distilled
    run = root / "run"
    files = sorted((run / "sample").glob("*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [50, 50, 20]  # sample.rows_per_shard
    sample = pa.concat_tables(pq.read_table(f) for f in files)
    assert sample.num_rows == 120 and len(set(sample.column("id").to_pylist())) == 120
    assert set(sample.column_names) == {"id", "text", "gold"}
    split = json.loads((run / "student-data" / "_manifest.json").read_text())
    assert (split["train_rows"], split["heldout_rows"]) == (90, 30)  # 25% of 120 held out
    train = pq.read_table(run / "student-data" / "train" / "part-0.parquet")
    heldout = pq.read_table(run / "student-data" / "heldout" / "part-0.parquet")
    assert not set(train.column("id").to_pylist()) & set(heldout.column("id").to_pylist())
    # The student learns the teacher's labels, not the corpus's.
    teacher = {r["id"]: r["label"] for r in pa.concat_tables(
        pq.read_table(p) for p in (run / "teacher").glob("*.parquet")).to_pylist()}
    assert all(teacher[r["id"]] == r["teacher_label"] for r in train.to_pylist())
    finetune = json.loads((run / "student" / "clsjob_finetune.json").read_text())
    assert finetune["train_rows"] == 90 and finetune["eval_rows"] == 30
    assert finetune["labels"] == json.loads((run / "teacher" / "_manifest.json").read_text())["labels"]


def test_a_missed_gate_stops_with_exit_2_and_says_by_how_much(distilled):
    root, (code_missed, said, gate), after_miss, _ = distilled
    assert code_missed == 2
    assert "gate.json" in after_miss and "labelled/_manifest.json" not in after_miss
    assert not gate["passed"] and gate["min_agreement"] == 0.999 and gate["heldout_rows"] == 30
    short = 0.999 - gate["agreement"]
    assert f"agreement {gate['agreement']:.4f} < 0.999 (short by {short:.4f})" in said
    # The rerun with a gate the student meets judged the same held-out labels again.
    rerun = json.loads((root / "run" / "gate.json").read_text())
    assert rerun["passed"] and rerun["agreement"] == gate["agreement"]


def test_the_rerun_resumes_after_the_last_finished_step_and_labels_the_corpus(distilled):
    root, _, after_miss, (code_passed, _) = distilled
    run = root / "run"
    assert code_passed == 0
    summary = json.loads((run / "distill.json").read_text())
    assert all(summary["steps_wall_s"][s] == "done before"
               for s in ("sample", "teacher", "split", "finetune", "merge", "gate"))
    assert isinstance(summary["steps_wall_s"]["label_corpus"], float)
    for name in ("sample/sample-00000.parquet", "teacher/_manifest.json", "student/clsjob_finetune.json",
                 "student-model/config.json", "heldout/_manifest.json"):
        assert (run / name).stat().st_mtime_ns == after_miss[name], name  # not redone
    gate = summary["gate"]
    labelled = pa.concat_tables(pq.read_table(p) for p in (run / "labelled").glob("*.parquet")).to_pylist()
    assert len(labelled) == 2 * ROWS
    # The threshold picked on the held-out rows decides who labels each corpus row.
    student_rows = [r for r in labelled if r["labelled_by"] == "student"]
    assert all(r["confidence"] >= gate["cascade_below"] for r in student_rows)
    corpus = summary["corpus"]
    assert corpus["teacher_rows"] == sum(r["labelled_by"] == "teacher" for r in labelled)
    assert corpus["rows"] == 2 * ROWS and corpus["teacher_share"] == pytest.approx(corpus["teacher_rows"] / (2 * ROWS))
    # Neither stage was given resources: the test cluster's 4 CPUs, less 1 for reading and
    # writing, split by the work each is expected to do (its CPU seconds a row as measured in
    # the gate and teacher steps; the teacher's times the share escalated on the held-out rows).
    def cpu_seconds_a_row(step: str) -> float:
        manifest = json.loads((run / step / "_manifest.json").read_text())
        assert manifest["busy"]["cpus_per_actor"] == 1.0  # the default pool each step ran on
        return manifest["busy"]["model_s"] * manifest["busy"]["cpus_per_actor"] / manifest["rows_out"]

    work = [cpu_seconds_a_row("heldout"), cpu_seconds_a_row("teacher") * gate["cascade_escalated_share"]]
    stages = json.loads((run / "labelled" / "_manifest.json").read_text())["cascade"]["stages"]
    assert [s["cpus_per_actor"] for s in stages] == ([2.0, 1.0] if work[0] >= work[1] else [1.0, 2.0])


def test_a_run_folder_of_another_config_is_refused(distilled):
    root, _, _, (_, (code_other, said)) = distilled
    assert code_other == 2
    assert "holds a distill run of another config (changed: sample)" in said
    assert json.loads((root / "run" / "_distill_work.json").read_text())["config"]["sample"]["rows"] == 120


def test_a_rerun_with_other_actor_pools_and_a_stricter_gate_labels_the_corpus_again(distilled):
    """Where the steps ran is not what they made: the teacher's resources may change between
    reruns. A gate that picks another threshold labels the corpus again with it (not skipped
    as done); the steps before it are kept."""
    root, _, _, _ = distilled
    run = root / "run"
    before = json.loads((run / "distill.json").read_text())
    kept = {name: (run / name).stat().st_mtime_ns
            for name in ("teacher/_manifest.json", "student-model/config.json", "heldout/_manifest.json")}
    config = yaml.safe_load((root / "passed.yaml").read_text())
    config["gate"]["cascade_agreement"] = 1.0
    config["teacher"]["resources"] = {"cpus_per_actor": 2}
    (root / "stricter.yaml").write_text(yaml.safe_dump(config))

    assert main(["distill", "--config", str(root / "stricter.yaml")]) == 0

    summary = json.loads((run / "distill.json").read_text())
    below = summary["gate"]["cascade_below"]
    assert below > before["gate"]["cascade_below"]
    assert isinstance(summary["steps_wall_s"]["label_corpus"], float)
    assert {name: (run / name).stat().st_mtime_ns for name in kept} == kept
    manifest = json.loads((run / "labelled" / "_manifest.json").read_text())
    student, teacher = manifest["cascade"]["stages"]
    assert student["escalate_below"] == below and teacher["cpus_per_actor"] == 2
    labelled = pa.concat_tables(pq.read_table(p) for p in (run / "labelled").glob("*.parquet")).to_pylist()
    assert len(labelled) == 2 * ROWS
    assert all(r["confidence"] >= below for r in labelled if r["labelled_by"] == "student")
    assert summary["corpus"]["teacher_rows"] == sum(r["labelled_by"] == "teacher" for r in labelled)
    assert summary["corpus"]["teacher_rows"] > before["corpus"]["teacher_rows"]


def test_a_teacher_step_stopped_mid_way_resumes_at_the_sample_file_it_had_not_finished(distilled):
    """What a driver killed while the teacher labels leaves: some sample files' parts and
    markers, no manifest. The rerun labels only the file without a marker. (Runs last: it
    rewrites the teacher's step of the module's run folder.)"""
    root, _, _, _ = distilled
    teacher = root / "run" / "teacher"
    before = {p.name: (p.stat().st_mtime_ns, pq.read_table(p)) for p in teacher.glob("*.parquet")}
    markers = sorted((teacher / PROGRESS).glob("*.json"))
    assert len(markers) == 3  # one per sample file
    lost = json.loads(markers[1].read_text())
    (teacher / "_manifest.json").unlink()
    markers[1].unlink()
    for part in lost["parts"]:
        (teacher / part["part"]).unlink()

    assert main(["distill", "--config", str(root / "passed.yaml")]) == 0

    summary = json.loads((root / "run" / "distill.json").read_text())
    assert isinstance(summary["steps_wall_s"]["teacher"], float)
    assert summary["steps_wall_s"]["split"] == "done before"
    redone = {part["part"] for part in lost["parts"]}
    assert redone and {p.name for p in teacher.glob("*.parquet")} == set(before)
    for name, (mtime, table) in before.items():
        path = teacher / name
        assert (path.stat().st_mtime_ns == mtime) == (name not in redone), name
        assert pq.read_table(path).column("label").equals(table.column("label"))
