"""task: multi_label end to end: a tiny Qwen2 fine-tuned with QLoRA (and a tiny BERT in full,
with pos_weight) through Ray Train, merged, and classified with `hf` through Ray Data; the
metrics against scikit-learn on the written rows; resume after the driver is killed."""
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from sklearn.metrics import f1_score, hamming_loss

from clsjob.backends import ModelError
from clsjob.config import ClassifyConfig, FinetuneConfig, MergeConfig, load_config, validate
from clsjob.contract import MANIFEST, METRICS, PROGRESS, REPORT
from clsjob.evaluation.multilabel import decide
from clsjob.evaluation.report import evaluate_output
from clsjob.finetune.merge import merge
from clsjob.finetune.train import run_finetune
from clsjob.run.pipeline import run_classify
from clsjob.store import InputError
from helpers import (REPO, check_output_contract, kill_driver_after_first_shard,
                     shipped_classify, write_shards)
from tiny_models import build_base, build_qwen2_classifier

# A task a tiny model learns in a few steps: each keyword in the text brings its label, and
# a row holds none, one, two or all three of them.
KEYWORDS = {"card": "billing", "parcel": "delivery", "account": "access"}
LABELS = sorted(KEYWORDS.values())
FILLER = "the film was a delight dull tedious".split()


def task_rows(n: int, seed: int) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    texts, golds = [], []
    for _ in range(n):
        present = [w for w in KEYWORDS if rng.random() < 0.4]
        rng.shuffle(present)
        texts.append(" ".join(present + [rng.choice(FILLER) for _ in range(rng.randint(1, 10))]))
        golds.append(sorted(KEYWORDS[w] for w in present))
    return texts, golds


def list_shard(n: int, seed: int) -> dict:
    texts, golds = task_rows(n, seed)
    return {"text": pa.array(texts + [None]), "labels": pa.array(golds + [["billing"]], pa.list_(pa.string()))}


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("ml")
    base = build_qwen2_classifier(root / "base", ["unused"], causal_lm=True)
    write_shards(root / "train", [list_shard(96, 0), list_shard(96, 1)])
    # Eval gold labels as one string joined by "|" (input.label_separator); "" = none apply.
    texts, golds = task_rows(64, 2)
    write_shards(root / "eval", [{"text": texts, "tags": ["|".join(g) for g in golds]}])
    summary = run_finetune(validate({
        "task": "multi_label",
        "base_model": str(base),
        "train": {"path": str(root / "train"), "label_column": "labels"},
        "eval": {"path": str(root / "eval"), "label_column": "tags", "label_separator": "|"},
        "training": {"epochs": 4, "learning_rate": 3e-3, "batch_size": 16, "max_length": 48,
                     "lora_r": 8, "lora_alpha": 16},
        "output": {"path": str(root / "adapter")},
    }, model=FinetuneConfig))
    model = Path(merge(validate({"adapter": str(root / "adapter"), "output": str(root / "merged"),
                                 "dtype": "float32"}, model=MergeConfig)))
    return root, summary, model


def test_finetune_tunes_a_threshold_per_label(trained):
    _, summary, _ = trained
    assert summary["task"] == "multi_label" and summary["labels"] == LABELS
    assert summary["train_rows"] == 192 and summary["eval_rows"] == 64  # null text skipped
    assert [set(e) >= {"eval_f1_macro", "eval_f1_micro"} for e in summary["epochs"]] == [True] * 4
    final = summary["final_eval"]
    assert final["eval_f1_macro"] >= 0.9  # learned (every label is a keyword)
    # Tuned on these rows over a grid holding 0.5: never worse than 0.5 on them.
    assert final["eval_tuned_f1_macro"] >= final["eval_f1_macro"] - 1e-9
    assert set(summary["thresholds"]) == set(LABELS)
    assert all(0 < t < 1 for t in summary["thresholds"].values())
    assert summary["calibration"] is None  # no temperature for sigmoids


def test_merge_carries_the_task_and_thresholds(trained):
    _, summary, model = trained
    config = json.loads((model / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["clsjob_thresholds"] == summary["thresholds"]


def classify_config(root: Path, model: Path, out: str) -> dict:
    return {"task": "multi_label",
            "input": {"path": str(root / "train"), "label_column": "labels"},
            "backend": {"model": str(model), "max_length": 48},
            "output": {"path": str(root / out), "rows_per_part": 40}}


def test_shipped_config_labels_sets_and_scores_them(trained, tmp_path):
    root, summary, model = trained
    texts, golds = task_rows(100, 3)
    # A null text (error row), a gold label outside the set (counted, not scored); rows with
    # an empty gold list (no label applies) are scored.
    write_shards(tmp_path / "in", [{"text": pa.array(texts + [None, "card the film"]),
                                    "topics": pa.array(golds + [["billing"], ["refund"]],
                                                       pa.list_(pa.string()))}])
    cfg = shipped_classify("classify-multilabel.yaml", model, tmp_path, "output.rows_per_part=40",
                           "output.review.rows=5")
    result = run_classify(cfg)
    out = tmp_path / "out"
    rows = check_output_contract(result, out, rows=102, errored=1)
    schema = pq.read_schema(next(out.glob("*.parquet")))
    assert "label" not in schema.names and schema.field("labels").type == pa.list_(pa.string())

    # Each row's labels are those over their thresholds; confidence the closest call's distance.
    thresholds = np.array([summary["thresholds"][name] for name in LABELS])
    ok = [r for r in rows if r["error"] is None]
    probs = np.array([r["probs"] for r in ok])
    applies, confidence = decide(probs, thresholds)
    assert [r["labels"] for r in ok] == [[LABELS[k] for k in np.flatnonzero(a)] for a in applies]
    assert np.allclose([r["confidence"] for r in ok], confidence, atol=1e-6)
    assert not np.allclose(probs.sum(axis=1), 1.0)  # independent sigmoids, not a softmax

    # The metrics against scikit-learn on the written rows (the scored ones).
    scored = [r for r in ok if "refund" not in r["gold"]]
    gold = np.array([[name in r["gold"] for name in LABELS] for r in scored])
    predicted = np.array([[name in r["labels"] for name in LABELS] for r in scored])
    m = json.loads((out / METRICS).read_text())
    assert m["task"] == "multi_label" and m["rows_scored"] == 100 and m["gold_outside_labels"] == 1
    assert m["f1_micro"] == pytest.approx(f1_score(gold, predicted, average="micro"))
    assert m["f1_macro"] == pytest.approx(f1_score(gold, predicted, average="macro", zero_division=0))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(gold, predicted))
    assert m["f1_micro"] >= 0.9
    report = (out / REPORT).read_text()
    assert "## Per label" in report and f"{m['f1_micro']:.4f}" in report
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["task"] == "multi_label"
    assert sum(manifest["distribution"]["labels"].values()) == sum(len(r["labels"]) for r in ok)
    # Rows for review: the 5 least confident (their closest call nearest its threshold).
    review = pq.read_table(out / "_review" / "review.parquet").to_pylist()
    by_confidence = sorted(ok, key=lambda r: (r["confidence"], r["id"]))[:5]
    assert [r["id"] for r in review] == [r["id"] for r in by_confidence]
    assert [r["labels"] for r in review] == [r["labels"] for r in by_confidence]
    # `clsjob evaluate` reads the parts back to the same numbers.
    again = evaluate_output(str(out), cfg.storage)
    assert again["f1_macro"] == pytest.approx(m["f1_macro"]) and again["rows_scored"] == 100


def test_a_task_the_model_was_not_trained_for_is_refused(trained):
    root, _, model = trained
    cfg = classify_config(root, model, "wrong")
    cfg.update(task="single_label", input={"path": str(root / "eval")})
    with pytest.raises(ModelError, match="fine-tuned multi_label"):
        run_classify(validate(cfg, model=ClassifyConfig))


def test_a_scalar_gold_column_is_refused_naming_column_and_file(trained, tmp_path):
    root, _, model = trained
    write_shards(tmp_path / "in", [{"text": ["card"], "tag": ["billing"]}])
    cfg = classify_config(root, model, "x")
    cfg["input"] = {"path": str(tmp_path / "in"), "label_column": "tag"}
    with pytest.raises(InputError, match=r"shard-000.parquet: input.label_column 'tag' is a string column"):
        run_classify(validate(cfg, model=ClassifyConfig))


def test_killed_driver_resumes_a_multilabel_run(trained, ray_cluster):
    root, _, model = trained
    write_shards(root / "many", [list_shard(60, 10 + s) for s in range(6)])
    config = root / "resume.yaml"
    cfg = classify_config(root, model, "resumed")
    cfg["input"]["path"] = str(root / "many")
    cfg["backend"]["micro_batch_size"] = 1  # slow enough to be killed half way
    config.write_text(yaml.safe_dump(cfg))
    done_before = kill_driver_after_first_shard(config, root / "resumed", ray_cluster)
    assert 0 < len(done_before) < 6
    summary = run_classify(load_config(config, model=ClassifyConfig))
    rows = check_output_contract(summary, root / "resumed", rows=6 * 61, errored=6)
    for name, mtime in done_before.items():  # finished shards were not redone
        assert (root / "resumed" / PROGRESS / name).stat().st_mtime_ns == mtime
    # Every row scored once: the counts from the markers equal the rows written.
    m = json.loads((root / "resumed" / METRICS).read_text())
    assert m["rows_scored"] == 6 * 60
    gold = np.array([[n in r["gold"] for n in LABELS] for r in rows if r["error"] is None])
    predicted = np.array([[n in r["labels"] for n in LABELS] for r in rows if r["error"] is None])
    assert m["f1_micro"] == pytest.approx(f1_score(gold, predicted, average="micro"))


def test_shipped_finetune_config_full_with_pos_weight(ray_cluster, tmp_path):
    """The shipped multi-label fine-tune (method full, an encoder) at tiny scale, with
    class_weights: balanced = each label's negative / positive rows as the loss's pos_weight."""
    base = build_base(tmp_path / "bert", "bert")
    write_shards(tmp_path / "train", [{"text": list_shard(96, 20)["text"],
                                       "topics": list_shard(96, 20)["labels"]}])
    texts, golds = task_rows(96, 20)
    summary = run_finetune(load_config(REPO / "configs" / "finetune-multilabel.yaml", [
        f"base_model={base}", f"train.path={tmp_path / 'train'}", f"eval.path={tmp_path / 'train'}",
        f"output.path={tmp_path / 'ft'}", "training.use_gpu=false", "training.workers=1",
        "training.cpus_per_worker=1", "training.epochs=1", "training.batch_size=16",
        "training.max_length=32", "training.learning_rate=1e-3", "training.class_weights=balanced",
        "cluster.autoscaling=false"], model=FinetuneConfig))
    positive = np.array([[n in g for n in LABELS] for g in golds]).sum(axis=0)
    assert summary["class_weights"] == pytest.approx(((96 - positive) / positive).tolist())
    assert summary["task"] == "multi_label" and set(summary["thresholds"]) == set(LABELS)
