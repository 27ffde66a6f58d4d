"""run_finetune(cfg): Ray Train's TorchTrainer runs the HF Trainer on each worker; the final
adapter (or full model), tokenizer and a training summary land in `output.path`."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import ray
import ray.train
import torch
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
from ray.train.torch import TorchTrainer
from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments

from clsjob.config import FinetuneConfig, config_hash
from clsjob.finetune.data import encode, read_labelled, settle_labels
from clsjob.finetune.model import build_trainable, load_tokenizer
from clsjob.finetune.progress import ProgressLog, RunningTotals
from clsjob.labels import LabelError, LabelSet
from clsjob.metrics import averaged, confusion_matrix, per_class_scores
from clsjob.placement import check_placement, ensure_ray, training_demand

log = logging.getLogger("clsjob")
SUMMARY = "clsjob_finetune.json"


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Train on the cluster, copy the final checkpoint to `output.path`, return the summary.

    Checkpoints go to `output.storage_path` under a run name fixed by the config: a worker
    that dies restarts from the last one (up to `training.max_failures` times), and running
    the same job again after the driver or cluster was lost resumes from it too."""
    summary_path = Path(cfg.output.path) / SUMMARY
    if summary_path.exists():
        log.info("finetune: %s already holds the finished model; nothing to do", cfg.output.path)
        return json.loads(summary_path.read_text())
    demand = training_demand(cfg.training)
    ensure_ray(demand)
    # Ray Train copies every print of a worker to both its stdout and its log, and the driver
    # shows both: each line twice. Workers log through `logging` instead (progress.py).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    check_placement(demand, cfg.cluster.autoscaling)
    storage_path, storage_fs = checkpoint_storage(cfg)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=cfg.training.workers, use_gpu=cfg.training.use_gpu,
                                     resources_per_worker={"CPU": cfg.training.cpus_per_worker}),
        # Named by what is trained, not by how the cluster behaves: a rerun finds its checkpoints.
        run_config=RunConfig(name=f"finetune-{config_hash(cfg, exclude={'cluster'})}",
                             storage_path=storage_path,
                             storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.training.max_failures)),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        final = Path(folder) / "final"
        if not final.is_dir():
            raise RuntimeError(f"training ended without a final model in {result.checkpoint.path}")
        shutil.copytree(final, cfg.output.path, dirs_exist_ok=True)
    return json.loads((Path(cfg.output.path) / SUMMARY).read_text())


def checkpoint_storage(cfg: FinetuneConfig):
    """Ray Train's storage path and filesystem: local, or S3 through the job's endpoint."""
    path = cfg.output.storage_path or str(Path(cfg.output.path).absolute() / "ray")
    if not path.startswith("s3://"):
        return path, None
    import pyarrow.fs

    # Ray Train writes through pyarrow; the same endpoint and region as every other S3 access,
    # credentials from the environment as always.
    endpoint = urlsplit(cfg.storage.endpoint_url) if cfg.storage.endpoint_url else None
    fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint.netloc if endpoint else None,
                                 scheme=endpoint.scheme if endpoint else "https",
                                 region=cfg.storage.region or "us-east-1",
                                 retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(
                                     max_attempts=cfg.storage.max_attempts))
    return path[len("s3://"):], fs


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
        metric_for_best_model="accuracy" if has_eval else None,
        logging_strategy="epoch",
        bf16=bf16,
        fp16=cuda and not bf16,  # GPUs before Ampere
        use_cpu=not cuda,
        seed=t.seed,
        report_to="none",
        disable_tqdm=True,
    )


class ClassifierTrainer(Trainer):
    """The HF Trainer with an optional per-label weight in the cross-entropy (for imbalanced
    data), feeding the loss and token counts of every micro-batch to the progress line."""

    def __init__(self, *args, label_weights: torch.Tensor | None = None,
                 running: RunningTotals | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_weights, self.running = label_weights, running

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.label_weights is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        gold = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits.float()
        loss = torch.nn.functional.cross_entropy(logits, gold, weight=self.label_weights.to(logits.device))
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.running is not None:
            self.running.add(loss, tokens)
        return loss


def label_weights(spec, labels: LabelSet, train_rows: list[dict]) -> torch.Tensor | None:
    """None for plain cross-entropy, else one weight per label id."""
    if spec == "none":
        return None
    if spec == "balanced":
        counts = np.bincount([r["labels"] for r in train_rows], minlength=len(labels))
        # rows / (labels x rows of the label); a label with no rows gets no weight to give.
        return torch.tensor(np.where(counts > 0, len(train_rows) / (len(labels) * np.maximum(counts, 1)), 0.0),
                            dtype=torch.float32)
    unknown = sorted(set(spec) - set(labels.names))
    if unknown:
        raise LabelError(f"training.class_weights names labels not in the label set: {unknown}")
    return torch.tensor([float(spec.get(name, 1.0)) for name in labels.names], dtype=torch.float32)


def resume_point(checkpoint, into: str) -> tuple[str | None, bool]:
    """(HF checkpoint folder to resume from, whether training already finished), from the
    checkpoint Ray Train hands a restarted or rerun job, copied into the folder `into`.

    Each worker needs a copy of its own: Ray's default `to_directory()` shares one folder per
    checkpoint between the workers of a node, and a worker that takes the download lock after
    another finished downloads again over the files the other is already loading (seen as
    safetensors' "header too small" after a restart)."""
    if checkpoint is None:
        return None, False
    folder = checkpoint.to_directory(into)
    if (Path(folder) / "final").is_dir():
        return folder, True
    return str(Path(folder) / RayTrainReportCallback.CHECKPOINT_NAME), False


def train_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    with tempfile.TemporaryDirectory(prefix="clsjob-finetune-") as work:
        train_in(FinetuneConfig.model_validate(config["cfg"]), Path(work))


def train_in(cfg: FinetuneConfig, work: Path) -> None:
    """One worker's training, with `work` as its scratch space (resume copy, HF checkpoints)."""
    started = time.monotonic()
    resume_from, finished = resume_point(ray.train.get_checkpoint(), str(work / "resume"))
    if finished:  # the job was rerun after training ended: hand the final model over again
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(resume_from)
                         if ray.train.get_context().get_world_rank() == 0 else None)
        return
    tokenizer = load_tokenizer(cfg.base_model)
    texts, golds = read_labelled(cfg.train, cfg.storage)
    labels = settle_labels(cfg.labels, golds)
    train_rows = encode(tokenizer, texts, golds, labels, cfg.training.max_length)
    eval_rows = []
    if cfg.eval:
        eval_rows = encode(tokenizer, *read_labelled(cfg.eval, cfg.storage), labels,
                           cfg.training.max_length)
    device = str(ray.train.torch.get_device())
    model = build_trainable(cfg.base_model, labels, cfg.training, tokenizer, device)
    weights = label_weights(cfg.training.class_weights, labels, train_rows)

    running = RunningTotals()
    trainer = ClassifierTrainer(
        model=model, args=training_arguments(cfg, str(work / "hf"), bool(eval_rows)),
        train_dataset=train_rows, eval_dataset=eval_rows or None,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=classification_metrics,
        callbacks=[RayTrainReportCallback(), ProgressLog(running)], label_weights=weights,
        running=running)
    trainer.remove_callback(PrinterCallback)  # ProgressLog says it once, through the logger
    trainer = prepare_trainer(trainer)
    if resume_from:
        log.info("finetune: resuming from %s", resume_from)
    train_out = trainer.train(resume_from_checkpoint=resume_from)
    per_epoch = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    final_eval = trainer.evaluate() if eval_rows else {}

    tokens = sum(len(r["input_ids"]) for r in train_rows) * cfg.training.epochs
    summary = {
        "base_model": cfg.base_model,
        "method": cfg.training.method,
        "quantization": cfg.training.quantization if cfg.training.method == "lora" else None,
        "labels": list(labels.names),
        "class_weights": weights.tolist() if weights is not None else None,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "epochs": per_epoch,
        "final_eval": final_eval,
        "train_loss": train_out.training_loss,
        "resumed_from_checkpoint": resume_from is not None,
        "wall_time_s": round(time.monotonic() - started, 2),
        "train_tokens_per_s": round(tokens / max(train_out.metrics["train_runtime"], 1e-9), 1),
        "peak_memory_gib": peak_memory_gib(device),
        "workers": cfg.training.workers,
        "config": cfg.model_dump(mode="json"),
    }
    # Every worker must report; only rank 0 attaches the final model.
    checkpoint = None
    if ray.train.get_context().get_world_rank() == 0:
        out = work / "out"
        final = out / "final"
        trainer.save_model(str(final))
        tokenizer.save_pretrained(final)
        (final / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
        checkpoint = ray.train.Checkpoint.from_directory(str(out))
    ray.train.report({k: v for k, v in final_eval.items() if isinstance(v, (int, float))},
                     checkpoint=checkpoint)


def peak_memory_gib(device: str) -> float:
    """Peak memory of this worker: the GPU's allocator on CUDA, the process's RSS on CPU."""
    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB -> GiB
