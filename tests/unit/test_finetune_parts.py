"""Pieces of the fine-tune that need neither a Ray cluster nor a model: loss weights, trainer
settings, resume points."""
from pathlib import Path

import numpy as np
import pytest
import torch

from clsjob.config import FinetuneConfig, validate
from clsjob.finetune.trainer import label_weights, training_arguments
from clsjob.labels import LabelError, LabelSet

LABELS = LabelSet(("a", "b", "c"))


def rows(*ids):
    return [{"labels": i} for i in ids]


def test_balanced_weights_follow_label_frequencies():
    w = label_weights("balanced", LABELS, rows(0, 0, 0, 0, 0, 0, 1, 1, 2))
    # rows / (labels x rows of the label): 9 / (3 x 6), 9 / (3 x 2), 9 / (3 x 1)
    assert w.tolist() == pytest.approx([0.5, 1.5, 3.0])
    assert label_weights("balanced", LABELS, rows(0, 1)).tolist() == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert label_weights("none", LABELS, rows(0)) is None


def test_sqrt_balanced_weights_are_the_square_roots_of_balanced():
    single = rows(0, 0, 0, 0, 0, 0, 1, 1, 2)
    assert label_weights("sqrt_balanced", LABELS, single).tolist() == pytest.approx(
        np.sqrt([0.5, 1.5, 3.0]).tolist())
    # Multi-label: pos_weight = sqrt(negative / positive rows); a label with no positive row 1.
    multi = [{"labels": [1, 0, 0]}, {"labels": [0, 0, 0]}, {"labels": [0, 0, 0]}, {"labels": [1, 1, 0]}]
    assert label_weights("sqrt_balanced", LABELS, multi).tolist() == pytest.approx([1.0, np.sqrt(3.0), 1.0])


def test_explicit_weights_default_to_one_and_unknown_labels_are_named():
    assert label_weights({"c": 4.0}, LABELS, rows(0)).tolist() == [1.0, 1.0, 4.0]
    with pytest.raises(LabelError, match=r"not in the label set: \['z'\]"):
        label_weights({"z": 2.0}, LABELS, rows(0))


def test_weighted_loss_is_the_weighted_cross_entropy():
    from clsjob.finetune.trainer import (ClassifierTrainer, weighted_binary_cross_entropy,
                                         weighted_cross_entropy)
    from clsjob.task import MULTI_LABEL, SINGLE_LABEL

    class Model(torch.nn.Module):
        def forward(self, input_ids):
            return type("Out", (), {"logits": input_ids.float()})()

    trainer = ClassifierTrainer.__new__(ClassifierTrainer)  # compute_loss needs no setup
    trainer.label_weights = torch.tensor([1.0, 3.0])
    trainer.weighted_loss = SINGLE_LABEL.pick(weighted_cross_entropy, weighted_binary_cross_entropy)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    loss = trainer.compute_loss(Model(), {"input_ids": logits, "labels": torch.tensor([0, 1])})
    per_row = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]), reduction="none")
    assert loss.item() == pytest.approx(((per_row * torch.tensor([1.0, 3.0])).sum() / 4.0).item())

    # A multi-label head: the weights are each label's pos_weight in its binary cross-entropy.
    trainer.weighted_loss = MULTI_LABEL.pick(weighted_cross_entropy, weighted_binary_cross_entropy)
    gold = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    loss = trainer.compute_loss(Model(), {"input_ids": logits, "labels": gold})
    p = torch.sigmoid(logits)
    by_hand = -(torch.tensor([1.0, 3.0]) * gold * torch.log(p) + (1 - gold) * torch.log(1 - p)).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_balanced_multilabel_weights_are_negative_over_positive_rows():
    rows = [{"labels": [1.0, 0.0, 0.0]}, {"labels": [1.0, 1.0, 0.0]}, {"labels": [0.0, 0.0, 0.0]},
            {"labels": [1.0, 0.0, 0.0]}]
    # label a: 3 positive, 1 negative; b: 1 and 3; c: none positive -> 1.
    assert label_weights("balanced", LABELS, rows).tolist() == pytest.approx([1 / 3, 3.0, 1.0])


def test_multilabel_epochs_are_ranked_by_macro_f1(tmp_path):
    from clsjob.finetune.trainer import multilabel_metrics

    cfg = validate({"task": "multi_label", "base_model": "m",
                    "train": {"path": "t", "label_column": "y"}, "output": {"path": "o"}},
                   model=FinetuneConfig)
    assert training_arguments(cfg, str(tmp_path), has_eval=True).metric_for_best_model == "f1_macro"
    logits = np.array([[3.0, -3.0], [3.0, 3.0], [-3.0, -3.0]])
    gold = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = multilabel_metrics((logits, gold))
    # label 0: tp 2, fp 0, fn 0 -> F1 1; label 1: tp 0, fp 1, fn 1 -> F1 0.
    assert m == pytest.approx({"f1_macro": 0.5, "f1_micro": 2 * 2 / (2 * 2 + 1 + 1),
                               "subset_accuracy": 1 / 3})


def test_trainer_settings_for_lora_under_ddp(tmp_path):
    cfg = validate({"base_model": "m", "train": {"path": "t", "label_column": "y"},
                    "training": {"gradient_accumulation_steps": 4, "max_grad_norm": 0.5},
                    "output": {"path": "o"}}, model=FinetuneConfig)
    args = training_arguments(cfg, str(tmp_path), has_eval=True)
    assert cfg.training.quantization == "nf4" and cfg.training.lora_r == 64
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert args.ddp_find_unused_parameters is False
    assert (args.gradient_accumulation_steps, args.max_grad_norm) == (4, 0.5)
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 0.05
    assert args.eval_strategy == "epoch" and args.save_strategy == "epoch"
    assert not args.bf16 and not args.fp16  # CPU: fp32


def test_each_worker_resumes_from_a_copy_of_its_own(tmp_path):
    """Two workers of a node must not share the downloaded checkpoint: with a shared folder
    the second download rewrites files the first worker is already loading."""
    from ray.train import Checkpoint

    from clsjob.finetune.train import resume_point

    stored = tmp_path / "stored"
    (stored / "checkpoint").mkdir(parents=True)
    weights = bytes(range(256)) * 64
    (stored / "checkpoint" / "adapter_model.safetensors").write_bytes(weights)
    checkpoint = Checkpoint.from_directory(str(stored))

    first, finished = resume_point(checkpoint, str(tmp_path / "worker0"))
    second, _ = resume_point(checkpoint, str(tmp_path / "worker1"))
    assert not finished and Path(first) == tmp_path / "worker0" / "checkpoint"
    # Worker 1 rewriting its copy (as a second download does) leaves worker 0's bytes whole;
    # with one shared folder this truncation would reach worker 0's file too.
    (Path(second) / "adapter_model.safetensors").write_bytes(b"")
    assert (Path(first) / "adapter_model.safetensors").read_bytes() == weights


def test_a_finished_run_resumes_as_finished(tmp_path):
    from ray.train import Checkpoint

    from clsjob.finetune.train import resume_point

    (tmp_path / "stored" / "final").mkdir(parents=True)
    folder, finished = resume_point(Checkpoint.from_directory(str(tmp_path / "stored")),
                                    str(tmp_path / "copy"))
    assert finished and (Path(folder) / "final").is_dir()
    assert resume_point(None, str(tmp_path / "none")) == (None, False)


def test_training_text_is_the_text_classify_labels(tmp_path):
    """Binary text, invalid UTF-8 and control characters: fine-tuning reads a row exactly as
    `classify` prepares it, and tokenises it to the same ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clsjob.backends.hf import encode_truncating
    from clsjob.config import InputConfig, StorageConfig
    from clsjob.finetune.data import encode, read_labelled
    from clsjob.run.prepare import prepare_chunk
    from tiny_models import build_tokenizer

    raw = [b"my card\x00payment \xff\xfe was declined", "parcel never arrived".encode(),
           b"\x01\x02 ", None, "le colis n'est jamais arriv\u00e9".encode()]
    pq.write_table(pa.table({"text": pa.array(raw, pa.binary()),
                             "label": ["billing", "delivery", "billing", "billing", "delivery"]}),
                   tmp_path / "train.parquet")
    inp = InputConfig(path=str(tmp_path), label_column="label")
    texts, golds = read_labelled(inp, StorageConfig())
    # Rows that classify would mark "text is null" / "text is empty" are not trained on.
    assert golds == ["billing", "delivery", "delivery"]
    assert texts[0] == "my card payment \ufffd\ufffd was declined"
    assert not any(t.startswith("b'") for t in texts)

    prepared = prepare_chunk(pq.read_table(tmp_path / "train.parquet"), "train.parquet", 0, inp)
    labelled = [t for t, e in zip(prepared.column("text").to_pylist(),
                                  prepared.column("error").to_pylist()) if e is None]
    assert texts == labelled
    tok = build_tokenizer(tmp_path / "tok")
    trained_ids = [row["input_ids"] for row in encode(tok, texts, golds, LabelSet(("billing", "delivery")), 8)]
    assert trained_ids == encode_truncating(tok, labelled, 8)[0]


def test_progress_line_between_epochs(caplog):
    """Every `every_s` seconds: step of total, the mean loss per optimizer step since the last
    line, tokens/s and the time left; one line per logged metrics dict; rank 0 only."""
    import logging
    from types import SimpleNamespace

    from clsjob.finetune.progress import ProgressLog, RunningTotals

    running = RunningTotals()
    progress = ProgressLog(running, every_s=0.0)
    state = SimpleNamespace(global_step=10, max_steps=40, epoch=0.25, is_world_process_zero=True)
    progress.on_train_begin(None, state, None)
    for _ in range(4):  # two optimizer steps of two micro-batches, each loss already halved
        running.add(torch.tensor(0.25), tokens=100)
    state.global_step = 12
    with caplog.at_level(logging.INFO, logger="clsjob"):
        progress.on_step_end(None, state, None)
        progress.on_log(None, state, None, logs={"loss": 0.51234, "epoch": 1.0})
        SimpleNamespace.__setattr__(state, "is_world_process_zero", False)
        progress.on_step_end(None, state, None)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("finetune: step 12/40 (30%), epoch 0.25, loss 0.5000, ")
    assert "tokens/s per worker" in lines[0] and "s left" in lines[0]
    assert lines[1] == "finetune: epoch 0.25: loss 0.5123"
    assert running.take() == (0.0, 0)


def test_tracked_parameters_are_flat_strings_and_final_metrics_carry_the_calibration():
    from clsjob.finetune.tracking import final_metrics, flatten

    assert flatten({"training": {"lr": 0.001, "report_to": ["mlflow"], "tracking": {}},
                    "labels": None, "path": "s3://b/x"}, prefix="clsjob.") == {
        "clsjob.training.lr": "0.001", "clsjob.training.report_to": '["mlflow"]',
        "clsjob.training.tracking": "{}", "clsjob.labels": "null", "clsjob.path": "s3://b/x"}
    calibration = {"temperature": 1.5, "ece_before": 0.1, "ece_after": 0.02, "nll_before": 0.5,
                   "nll_after": 0.4, "rows": 48, "abstain": {"below": 0.6, "max_accuracy_loss": 0.02}}
    assert final_metrics({"eval_accuracy": 0.9, "eval_runtime": 1, "epoch": 3.0}, calibration) == {
        "final/eval_accuracy": 0.9, "final/eval_runtime": 1.0, "final/epoch": 3.0,
        "calibration/temperature": 1.5, "calibration/ece_before": 0.1, "calibration/ece_after": 0.02,
        "calibration/nll_before": 0.5, "calibration/nll_after": 0.4, "calibration/abstain_below": 0.6}
    assert final_metrics({}, None) == {}  # no eval rows: nothing to add


def test_a_tracker_that_is_not_installed_is_named_before_training(monkeypatch):
    import importlib.util

    from clsjob.finetune import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    tracking.check_installed(["mlflow", "tensorboard"])
    with pytest.raises(ModuleNotFoundError, match=r"report_to names \['wandb'\].*clsjob\[tracking\]"):
        tracking.check_installed(["tensorboard", "wandb"])
    with pytest.raises(ValueError, match="names a tracker twice"):
        validate({"base_model": "m", "train": {"path": "t", "label_column": "y"}, "output": {"path": "o"},
                  "training": {"report_to": ["wandb", "wandb"]}}, model=FinetuneConfig)


def test_only_rank_zero_tracks(tmp_path):
    from clsjob.config import TrackingConfig
    from clsjob.finetune.tracking import Tracker

    other = Tracker(["mlflow", "tensorboard", "wandb"], TrackingConfig(), tmp_path / "t", "run", rank=1)
    assert other.callbacks({"a": 1}) == []
    other.finish({"final/x": 1.0}, step=3)
    other.copy_into(tmp_path / "model")
    assert not (tmp_path / "t").exists() and not (tmp_path / "model").exists()


def test_training_files_are_checked_on_the_driver_naming_key_and_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clsjob.finetune.data import check_inputs
    from clsjob.store import InputError

    pq.write_table(pa.table({"text": ["a"], "tags": ["x|y"]}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"text": ["a"], "tags": pa.array([["x"]])}), tmp_path / "dev.parquet")

    def cfg(task: str, **train):
        return validate({"task": task, "base_model": "m",
                         "train": {"path": str(tmp_path / "train.parquet"), "label_column": "tags", **train},
                         "eval": {"path": str(tmp_path / "dev.parquet"), "label_column": "tags"},
                         "output": {"path": "o"}}, model=FinetuneConfig)

    with pytest.raises(InputError, match=r"train.parquet: train.label_column 'tags' is a string "
                                         r"column, but task: multi_label needs a list<string> "
                                         r"column or train.label_separator"):
        check_inputs(cfg("multi_label"))
    check_inputs(cfg("multi_label", label_separator="|"))  # split: fine
    with pytest.raises(InputError, match=r"dev.parquet: eval.label_column 'tags' has type list"):
        check_inputs(cfg("single_label"))
    with pytest.raises(InputError, match=r"train.parquet: train.text_column 'body' is not a column"):
        check_inputs(cfg("multi_label", label_separator="|", text_column="body"))
