"""The HF Trainer as clsjob runs it on each Ray Train worker: its settings, a weighted loss
for imbalanced data, the metrics of every evaluation, and the progress line's feed."""
from __future__ import annotations

import numpy as np
import torch
from transformers import (DataCollatorWithPadding, PrinterCallback, Trainer, TrainerCallback,
                          TrainingArguments)

from clsjob.config import FinetuneConfig
from clsjob.evaluation.metrics import averaged, confusion_matrix, per_class_scores
from clsjob.evaluation.multilabel import count_multihot, summarize_multilabel
from clsjob.finetune.progress import ProgressLog, RunningTotals
from clsjob.labels import LabelError, LabelSet
from clsjob.task import Task


def classification_metrics(eval_pred) -> dict:
    """HF Trainer hook: accuracy and weighted precision / recall / F1 on the eval rows."""
    logits, gold = eval_pred
    logits = np.asarray(logits)
    matrix = confusion_matrix(gold, logits.argmax(axis=-1), logits.shape[-1])
    avg = averaged(per_class_scores(matrix))
    return {"accuracy": float(np.trace(matrix) / max(matrix.sum(), 1)),
            "f1_weighted": avg["f1_weighted"], "precision_weighted": avg["precision_weighted"],
            "recall_weighted": avg["recall_weighted"]}


def multilabel_metrics(eval_pred) -> dict:
    """HF Trainer hook for a multi-label head: micro- and macro-F1 and subset accuracy at the
    0.5 threshold on every label (the tuned thresholds come after training)."""
    logits, gold = eval_pred
    predicted = 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64))) >= 0.5
    t = count_multihot(np.asarray(gold) > 0.5, predicted)
    labels = LabelSet(tuple(str(k) for k in range(t.n)))
    m = summarize_multilabel(t, labels)
    return {"f1_macro": m["f1_macro"], "f1_micro": m["f1_micro"],
            "subset_accuracy": m["subset_accuracy"]}


def best_model_metric(cfg: FinetuneConfig) -> str:
    """What keep_best ranks the epochs by."""
    return Task.of(cfg.task).ranked_by


def training_arguments(cfg: FinetuneConfig, output_dir: str, has_eval: bool) -> TrainingArguments:
    t = cfg.training
    cuda = torch.cuda.is_available() and t.use_gpu
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size * 2,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type="cosine",
        max_grad_norm=t.max_grad_norm,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen (LoRA) bases and with DDP; every
        # trainable parameter gets a gradient each step, so DDP's unused-parameter search
        # (an extra pass, and an error with checkpointing) stays off.
        gradient_checkpointing_kwargs={"use_reentrant": False},
        ddp_find_unused_parameters=False,
        # Length-grouped batches waste far less compute on padding than random ones.
        train_sampling_strategy="group_by_length",
        eval_strategy="epoch" if has_eval else "no",
        # Checkpoint every epoch: the callback hands each one to Ray Train (resume point).
        save_strategy="epoch",
        save_total_limit=1,
        load_best_model_at_end=has_eval and t.keep_best,
        metric_for_best_model=best_model_metric(cfg) if has_eval else None,
        logging_strategy="epoch",
        bf16=bf16,
        fp16=cuda and not bf16,  # GPUs before Ampere
        use_cpu=not cuda,
        seed=t.seed,
        report_to="none",
        disable_tqdm=True,
    )


class ClassifierTrainer(Trainer):
    """The HF Trainer with an optional per-label weight in the loss (for imbalanced data),
    feeding the loss and token counts of every micro-batch to the progress line. The weights
    are cross-entropy class weights, or for a multi-label head the binary cross-entropy's
    weight of each label's positive rows (pos_weight): `weighted_loss`, as the task picks."""

    def __init__(self, *args, label_weights: torch.Tensor | None = None,
                 running: RunningTotals | None = None, weighted_loss=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_weights, self.running, self.weighted_loss = label_weights, running, weighted_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.label_weights is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        gold = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits.float()
        loss = self.weighted_loss(logits, gold, self.label_weights.to(logits.device))
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.running is not None:
            self.running.add(loss, tokens)
        return loss


def weighted_cross_entropy(logits: torch.Tensor, gold: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, gold, weight=weights)


def weighted_binary_cross_entropy(logits: torch.Tensor, gold: torch.Tensor,
                                  weights: torch.Tensor) -> torch.Tensor:
    """A multi-label head: a sigmoid and binary cross-entropy per label, each label's
    positive rows weighted."""
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, gold.float(), pos_weight=weights)


def label_weights(spec, labels: LabelSet, train_rows: list[dict]) -> torch.Tensor | None:
    """None for a plain loss, else one weight per label id. Multi-label rows (a 0/1 target per
    label): balanced = each label's negative / positive rows, as pos_weight is meant.
    sqrt_balanced = the square root of balanced: GoEmotions' rarest label (77 of 43,410 rows)
    weighs ~24, not ~560, so a few dozen rows push their label up without deciding the loss."""
    if spec == "none":
        return None
    if spec == "sqrt_balanced":
        return label_weights("balanced", labels, train_rows).sqrt()
    if spec == "balanced" and train_rows and isinstance(train_rows[0]["labels"], list):
        positive = np.array([r["labels"] for r in train_rows]).sum(axis=0)
        # A label with no positive row has nothing to weight: 1.
        return torch.tensor(np.where(positive > 0, (len(train_rows) - positive) / np.maximum(positive, 1), 1.0),
                            dtype=torch.float32)
    if spec == "balanced":
        counts = np.bincount([r["labels"] for r in train_rows], minlength=len(labels))
        # rows / (labels x rows of the label); a label with no rows gets no weight to give.
        return torch.tensor(np.where(counts > 0, len(train_rows) / (len(labels) * np.maximum(counts, 1)), 0.0),
                            dtype=torch.float32)
    unknown = sorted(set(spec) - set(labels.names))
    if unknown:
        raise LabelError(f"training.class_weights names labels not in the label set: {unknown}")
    return torch.tensor([float(spec.get(name, 1.0)) for name in labels.names], dtype=torch.float32)


def build_trainer(cfg: FinetuneConfig, model, tokenizer, labels: LabelSet, train_rows: list[dict],
                  eval_rows: list[dict], output_dir: str,
                  callbacks: list[TrainerCallback]) -> tuple[ClassifierTrainer, torch.Tensor | None]:
    """The trainer for one worker, and the label weights its loss uses (None: plain)."""
    weights = label_weights(cfg.training.class_weights, labels, train_rows)
    running = RunningTotals()
    task = Task.of(cfg.task)
    trainer = ClassifierTrainer(
        model=model, args=training_arguments(cfg, output_dir, bool(eval_rows)),
        train_dataset=train_rows, eval_dataset=eval_rows or None,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=task.pick(classification_metrics, multilabel_metrics),
        callbacks=[*callbacks, ProgressLog(running)], label_weights=weights, running=running,
        weighted_loss=task.pick(weighted_cross_entropy, weighted_binary_cross_entropy))
    trainer.remove_callback(PrinterCallback)  # ProgressLog says it once, through the logger
    return trainer, weights
