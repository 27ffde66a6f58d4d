"""run_finetune(cfg): Ray Train's TorchTrainer runs the HF Trainer on each worker; the final
adapter (or full model), tokenizer and a training summary land in `output.path`."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
from ray.train.torch import TorchTrainer

from clsjob import model_cache, store
from clsjob.config import FinetuneConfig, config_hash
from clsjob.evaluation.abstain import pick_threshold
from clsjob.evaluation.calibration import calibrate
from clsjob.evaluation.multilabel import count_multihot, summarize_multilabel, tune_thresholds
from clsjob.finetune.data import check_inputs, encode, read_labelled, settle_labels
from clsjob.finetune.distance_index import DistanceIndex, build_distance_index
from clsjob.finetune.model import build_trainable, check_base_model, load_tokenizer
from clsjob.finetune.summary import SUMMARY, peak_memory_gib  # noqa: F401  (re-exported)
from clsjob.finetune.tracking import TRACKING, Tracker, check_installed, final_metrics
from clsjob.finetune.trainer import build_trainer
from clsjob.labels import LabelSet
from clsjob.model_folder import DISTANCE_GAUSSIANS, DISTANCE_INDEX, scaled_softmax
from clsjob.run.placement import check_placement, ensure_ray, training_demand
from clsjob.task import Task

log = logging.getLogger("clsjob")
# Settings that do not change what is trained: the run name (and so its checkpoints) ignores them.
NOT_TRAINING = {"cluster": True, "storage": {"model_cache"},
                "training": {"abstain_accuracy_loss", "threshold_min_support", "report_to",
                             "tracking", "distance_index_rows", "distance_k"}}


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Train on the cluster, copy the final checkpoint to `output.path`, return the summary.

    Checkpoints go to `output.storage_path` under a run name fixed by the config: a worker
    that dies restarts from the last one (up to `training.max_failures` times), and running
    the same job again after the driver or cluster was lost resumes from it too."""
    summary_url = store.join(cfg.output.path, SUMMARY)
    if store.exists(summary_url, cfg.storage):
        log.info("finetune: %s already holds the finished model; nothing to do", cfg.output.path)
        return store.read_json(summary_url, cfg.storage)
    check_installed(cfg.training.report_to)
    demand = training_demand(cfg.training)
    ensure_ray(demand)
    # Ray Train copies every print of a worker to both its stdout and its log, and the driver
    # shows both: each line twice. Workers log through `logging` instead (progress.py).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    check_placement(demand, cfg.cluster.autoscaling)
    check_inputs(cfg)  # every train and eval file's columns, before a worker starts
    cfg = check_base_model(cfg)
    storage_path, storage_fs = checkpoint_storage(cfg)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=cfg.training.workers, use_gpu=cfg.training.use_gpu,
                                     resources_per_worker={"CPU": cfg.training.cpus_per_worker}),
        # Named by what is trained, not by how the cluster behaves: a rerun finds its checkpoints.
        run_config=RunConfig(name=f"finetune-{config_hash(cfg, exclude=NOT_TRAINING)}",
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
        # The summary goes last: its presence is what says the folder is finished.
        model_cache.publish_folder(lambda out: copy_model(final, out, but=SUMMARY),
                                   cfg.output.path, cfg.storage)
        store.write_text((final / SUMMARY).read_text(), summary_url, cfg.storage)
    return store.read_json(summary_url, cfg.storage)


def copy_model(source: Path, target: Path, but: str) -> None:
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=lambda _, names: [but] if but in names else [])


def checkpoint_storage(cfg: FinetuneConfig):
    """Ray Train's storage path and filesystem: local, or S3 through the job's endpoint."""
    path = cfg.output.storage_path or (store.join(cfg.output.path, "ray")
                                       if model_cache.is_remote(cfg.output.path)
                                       else str(Path(cfg.output.path).absolute() / "ray"))
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
    """One worker's training, with `work` as its scratch space (resume copy, HF checkpoints):
    set up, train, report."""
    started = time.monotonic()
    resume_from, finished = resume_point(ray.train.get_checkpoint(), str(work / "resume"))
    if finished:  # the job was rerun after training ended: hand the final model over again
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(resume_from)
                         if ray.train.get_context().get_world_rank() == 0 else None)
        return
    base = model_cache.local_model(cfg.base_model, cfg.storage, key="base_model")
    data = load_examples(cfg, base)
    device = str(ray.train.torch.get_device())
    model = build_trainable(base, data.labels, cfg.training, data.tokenizer, device, data.task)
    context = ray.train.get_context()
    tracker = Tracker(cfg.training.report_to, cfg.training.tracking, work / TRACKING,
                      context.get_experiment_name(), context.get_world_rank())
    try:
        trainer, weights = build_trainer(
            cfg, model, data.tokenizer, data.labels, data.train_rows, data.eval_rows,
            str(work / "hf"), [RayTrainReportCallback(), *tracker.callbacks(cfg.model_dump(mode="json"))])
        trainer = prepare_trainer(trainer)
        if resume_from:
            log.info("finetune: resuming from %s", resume_from)
        train_out = trainer.train(resume_from_checkpoint=resume_from)
        # Each epoch's evaluation, read before the final one adds its own entry.
        per_epoch = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
        # What merge writes into the model folder from the eval rows: a temperature and an
        # abstention threshold, or each label's decision threshold.
        evaluate = data.task.pick(final_evaluation, multilabel_evaluation)
        final_eval, calibration, thresholds = evaluate(trainer, data.eval_rows, data.labels, cfg.training)
        # abstain.score: distance's index and threshold: rank 0 alone saves the model.
        index, distance = None, None
        if cfg.training.distance_index_rows and context.get_world_rank() == 0:
            index, distance = build_distance_index(trainer.model, data.tokenizer, data.labels,
                                                   data.train_rows, data.eval_rows, cfg.training, device)
        tracker.finish(final_metrics(final_eval, calibration), trainer.state.global_step)
        summary = training_summary(cfg, data, train_out, per_epoch, final_eval, calibration,
                                   weights, resume_from is not None, time.monotonic() - started,
                                   device, thresholds, distance)
        report_final(trainer, data.tokenizer, summary, final_eval, work, tracker, index)
    finally:
        tracker.close()


def final_evaluation(trainer, eval_rows: list[dict], labels: LabelSet,
                     training) -> tuple[dict, dict | None, None]:
    """A single-label head: the final model's eval metrics, the temperature fitted on its eval
    logits (calibration.py) and the abstention threshold picked on the calibrated confidences
    (abstain.py, within training.abstain_accuracy_loss), both of which `merge` writes into the
    model folder: one pass over the eval rows. Every worker takes part (the logits are
    gathered from all of them)."""
    max_accuracy_loss = training.abstain_accuracy_loss
    if not eval_rows:
        log.info("finetune: no eval rows, so no temperature is fitted (confidences stay raw)")
        return {}, None, None
    out = trainer.predict(eval_rows, metric_key_prefix="eval")
    calibration = calibrate(out.predictions, out.label_ids)
    if calibration["at_bound"]:
        log.warning("finetune: the temperature fit stopped at the edge of its range (%.2f): the "
                    "eval rows are all right, or the model's answers say little of their labels; "
                    "more (or harder) eval rows give a temperature to trust",
                    calibration["temperature"])
    log.info("finetune: temperature %.3f fitted on %d eval rows: ECE %.4f -> %.4f, NLL %.4f -> %.4f",
             calibration["temperature"], calibration["rows"], calibration["ece_before"],
             calibration["ece_after"], calibration["nll_before"], calibration["nll_after"])
    calibrated = scaled_softmax(out.predictions, calibration["temperature"])
    below = pick_threshold(calibrated, out.label_ids, max_accuracy_loss)
    calibration["abstain"] = {"below": round(below, 6), "max_accuracy_loss": max_accuracy_loss,
                              "eval_rows_under": int((calibrated.max(axis=1) < below).sum())}
    return out.metrics, calibration, None


def multilabel_evaluation(trainer, eval_rows: list[dict], labels: LabelSet,
                          training) -> tuple[dict, None, dict | None]:
    """A multi-label head's final evaluation: each label's threshold tuned on the eval rows
    (with training.threshold_min_support)
    (multilabel.tune_thresholds; `merge` writes them into the model folder), and the eval
    metrics at 0.5 and at the tuned thresholds. No temperature: a sigmoid per label has no
    softmax to scale, and the tuned threshold already moves each label's decision.

    The thresholds are tuned and judged on the same eval rows: the tuned figures are the
    best these rows allow, not a forecast; judge them on rows of their own (classify)."""
    if not eval_rows:
        log.info("finetune: no eval rows, so every label keeps the threshold 0.5")
        return {}, None, None
    out = trainer.predict(eval_rows, metric_key_prefix="eval")
    probs = 1 / (1 + np.exp(-np.asarray(out.predictions, dtype=np.float64)))
    gold = np.asarray(out.label_ids) > 0.5
    thresholds = tune_thresholds(probs, gold, training.threshold_min_support)
    tuned = summarize_multilabel(count_multihot(gold, probs >= thresholds[None, :]), labels)
    log.info("finetune: thresholds tuned on %d eval rows: macro-F1 %.4f -> %.4f, micro-F1 "
             "%.4f -> %.4f", len(gold), out.metrics["eval_f1_macro"], tuned["f1_macro"],
             out.metrics["eval_f1_micro"], tuned["f1_micro"])
    final = {**out.metrics, "eval_tuned_f1_macro": tuned["f1_macro"],
             "eval_tuned_f1_micro": tuned["f1_micro"],
             "eval_tuned_subset_accuracy": tuned["subset_accuracy"]}
    return final, None, {name: round(float(t), 4) for name, t in zip(labels.names, thresholds)}


@dataclass(frozen=True)
class Examples:
    task: Task
    tokenizer: object
    labels: LabelSet
    train_rows: list[dict]
    eval_rows: list[dict]


def load_examples(cfg: FinetuneConfig, base: str) -> Examples:
    """Tokenised training and eval rows and the label set they settle (`base`: the base
    model's local folder)."""
    tokenizer = load_tokenizer(base)
    task = Task.of(cfg.task)
    texts, golds = read_labelled(cfg.train, cfg.storage, task)
    labels = settle_labels(cfg.labels, golds)
    train_rows = encode(tokenizer, texts, golds, labels, cfg.training.max_length)
    eval_rows = []
    if cfg.eval:
        eval_rows = encode(tokenizer, *read_labelled(cfg.eval, cfg.storage, task, "eval"),
                           labels, cfg.training.max_length)
    return Examples(task, tokenizer, labels, train_rows, eval_rows)


def training_summary(cfg: FinetuneConfig, data: Examples, train_out, per_epoch: list[dict],
                     final_eval: dict, calibration: dict | None, weights, resumed: bool,
                     wall_s: float, device: str, thresholds: dict | None = None,
                     distance: dict | None = None) -> dict:
    """What `clsjob_finetune.json` records (merge reads base_model, method, labels, task and
    thresholds)."""
    tokens = sum(len(r["input_ids"]) for r in data.train_rows) * cfg.training.epochs
    return {
        "base_model": cfg.base_model,
        "method": cfg.training.method,
        "quantization": cfg.training.quantization if cfg.training.method == "lora" else None,
        "labels": list(data.labels.names),
        "task": cfg.task,
        # A multi-label head: each label's decision threshold, tuned on the eval rows.
        "thresholds": thresholds,
        "class_weights": weights.tolist() if weights is not None else None,
        "train_rows": len(data.train_rows),
        "eval_rows": len(data.eval_rows),
        "epochs": per_epoch,
        "final_eval": final_eval,
        # The temperature fitted on the eval rows, with ECE and NLL before and after, and
        # the abstention threshold picked on them (`abstain`).
        "calibration": calibration,
        # training.distance_index_rows: the index's size, k and the distance threshold picked
        # on the eval rows (distance_index.py).
        "distance": distance,
        "train_loss": train_out.training_loss,
        "resumed_from_checkpoint": resumed,
        "wall_time_s": round(wall_s, 2),
        "train_tokens_per_s": round(tokens / max(train_out.metrics["train_runtime"], 1e-9), 1),
        "peak_memory_gib": peak_memory_gib(device),
        "workers": cfg.training.workers,
        "config": cfg.model_dump(mode="json"),
    }


def report_final(trainer, tokenizer, summary: dict, final_eval: dict, work: Path,
                 tracker: Tracker, index: DistanceIndex | None = None) -> None:
    """Every worker must report; only rank 0 attaches the final model (and the trackers'
    files, and the distance index)."""
    checkpoint = None
    if ray.train.get_context().get_world_rank() == 0:
        out = work / "out"
        final = out / "final"
        trainer.save_model(str(final))
        tokenizer.save_pretrained(final)
        (final / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
        if index is not None:
            np.save(final / DISTANCE_INDEX, index.knn, allow_pickle=False)
            np.savez(final / DISTANCE_GAUSSIANS, means=index.gaussians.means.astype(np.float32),
                     precision=index.gaussians.precision.astype(np.float32))
        tracker.copy_into(final)
        checkpoint = ray.train.Checkpoint.from_directory(str(out))
    ray.train.report({k: v for k, v in final_eval.items() if isinstance(v, (int, float))},
                     checkpoint=checkpoint)
