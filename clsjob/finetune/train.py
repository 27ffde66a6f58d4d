"""run_finetune(cfg): Ray Train's TorchTrainer runs the HF Trainer on each worker; the final
adapter (or full model), tokenizer and a training summary land in `output.path`."""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
from ray.train.torch import TorchTrainer
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from clsjob.config import FinetuneConfig, config_hash
from clsjob.finetune.data import encode, read_labelled, settle_labels
from clsjob.finetune.model import build_trainable, load_tokenizer
from clsjob.labels import LabelSet
from clsjob.metrics import averaged, confusion_matrix, per_class_scores
from clsjob.pipeline import ensure_ray

log = logging.getLogger("clsjob")
SUMMARY = "clsjob_finetune.json"


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Train on the cluster, copy the final checkpoint to `output.path`, return the summary."""
    if Path(cfg.output.path).exists() and any(Path(cfg.output.path).iterdir()):
        raise FileExistsError(f"output.path {cfg.output.path} is not empty; choose a new folder")
    ensure_ray()
    storage = cfg.output.storage_path or str(Path(cfg.output.path).absolute() / "ray")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=cfg.training.workers, use_gpu=cfg.training.use_gpu),
        run_config=RunConfig(name=f"finetune-{config_hash(cfg)}", storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        final = Path(folder) / "final"
        if not final.is_dir():
            raise RuntimeError(f"training ended without a final model in {result.checkpoint.path}")
        shutil.copytree(final, cfg.output.path, dirs_exist_ok=True)
    return json.loads((Path(cfg.output.path) / SUMMARY).read_text())


def classification_metrics(eval_pred) -> dict:
    """HF Trainer hook: accuracy and weighted precision / recall / F1 on the eval rows."""
    logits, gold = eval_pred
    logits = np.asarray(logits)
    matrix = confusion_matrix(gold, logits.argmax(axis=-1), logits.shape[-1])
    avg = averaged(per_class_scores(matrix))
    return {"accuracy": float(np.trace(matrix) / max(matrix.sum(), 1)),
            "f1_weighted": avg["f1_weighted"], "precision_weighted": avg["precision_weighted"],
            "recall_weighted": avg["recall_weighted"]}


def training_arguments(cfg: FinetuneConfig, output_dir: str, has_eval: bool) -> TrainingArguments:
    t = cfg.training
    cuda = torch.cuda.is_available() and t.use_gpu
    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size * 2,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type="cosine",
        max_grad_norm=1.0,
        # Length-grouped batches waste far less compute on padding than random ones.
        train_sampling_strategy="group_by_length",
        eval_strategy="epoch" if has_eval else "no",
        # Checkpoint every epoch: the callback hands each one to Ray Train (resume point).
        save_strategy="epoch",
        save_total_limit=1,
        logging_strategy="epoch",
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        seed=t.seed,
        report_to="none",
        disable_tqdm=True,
    )


def train_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    cfg = FinetuneConfig.model_validate(config["cfg"])
    started = time.monotonic()
    tokenizer = load_tokenizer(cfg.base_model)
    texts, golds = read_labelled(cfg.train, cfg.storage)
    labels = settle_labels(cfg.labels, golds)
    train_rows = encode(tokenizer, texts, golds, labels, cfg.training.max_length)
    eval_rows = []
    if cfg.eval:
        eval_rows = encode(tokenizer, *read_labelled(cfg.eval, cfg.storage), labels,
                           cfg.training.max_length)
    model = build_trainable(cfg.base_model, labels, cfg.training, tokenizer)

    with tempfile.TemporaryDirectory() as work:
        trainer = Trainer(
            model=model, args=training_arguments(cfg, work, bool(eval_rows)),
            train_dataset=train_rows, eval_dataset=eval_rows or None,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=classification_metrics, callbacks=[RayTrainReportCallback()])
        trainer = prepare_trainer(trainer)
        train_out = trainer.train()
        per_epoch = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
        final_eval = trainer.evaluate() if eval_rows else {}

    tokens = sum(len(r["input_ids"]) for r in train_rows) * cfg.training.epochs
    summary = {
        "base_model": cfg.base_model,
        "method": cfg.training.method,
        "labels": list(labels.names),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "epochs": per_epoch,
        "final_eval": final_eval,
        "train_loss": train_out.training_loss,
        "wall_time_s": round(time.monotonic() - started, 2),
        "train_tokens_per_s": round(tokens / max(train_out.metrics["train_runtime"], 1e-9), 1),
        "workers": cfg.training.workers,
        "config": cfg.model_dump(mode="json"),
    }
    # Every worker must report; only rank 0 attaches the final model.
    with tempfile.TemporaryDirectory() as out:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            final = Path(out) / "final"
            trainer.save_model(str(final))
            tokenizer.save_pretrained(final)
            (final / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
            checkpoint = ray.train.Checkpoint.from_directory(out)
        ray.train.report({k: v for k, v in final_eval.items() if isinstance(v, (int, float))},
                         checkpoint=checkpoint)
