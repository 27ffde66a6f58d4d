"""`clsjob finetune` and `clsjob merge` configs."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from clsjob.config.base import TASK, Labels, Section, StorageConfig, TaskName
from clsjob.config.classify import ClusterConfig, InputConfig, check_task


class TrackingConfig(Section):
    experiment: str = Field("clsjob", min_length=1,
                            description="MLflow experiment and W&B project the run is logged under.")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (a server, sqlite:///..., or a file store). None = "
                          "$MLFLOW_TRACKING_URI where the job's runtime env sets it, else a file "
                          "store in <output.path>/tracking/mlruns.")
    wandb_mode: Literal["online", "offline"] | None = Field(
        None, description="offline: the W&B run is written to <output.path>/tracking/wandb, for "
                          "`wandb sync` later. None = $WANDB_MODE, else online.")


class TrainingConfig(Section):
    method: Literal["lora", "full"] = Field(
        "lora", description="lora = adapter + head; full = every weight (small encoders).")
    epochs: float = Field(3, gt=0, description="Passes over the training rows; evaluated and "
                                                "checkpointed after each.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak rate of the cosine schedule; a "
                                                         "new head over many labels may need more.")
    batch_size: int = Field(32, gt=0, description="Rows per step per worker.")
    max_length: int = Field(512, gt=0, description="Tokens per training row.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent "
                                                              "warming the rate up.")
    lora_r: int = Field(64, gt=0, description="LoRA rank, on the body's linear layers.")
    lora_alpha: int = Field(64, gt=0, description="LoRA scale numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    quantization: Literal["nf4", "none"] = Field(
        "nf4", description="lora only: the frozen base in 4-bit NF4 with double quantisation "
                           "and bf16 compute (QLoRA); none = plain LoRA. Falls back to none, "
                           "with a warning, where bitsandbytes cannot run.")
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass: far less memory for "
                          "about a third more compute (non-reentrant, so it works with LoRA "
                          "and DDP).")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per "
                                                                   "optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    class_weights: Literal["none", "balanced", "sqrt_balanced"] | dict[str, float] = Field(
        "none", description="Loss weight per label for imbalanced data: balanced = "
                            "rows / (labels x rows of the label), sqrt_balanced = its square "
                            "root, or an explicit mapping. task: multi_label: the weight of a "
                            "label's positive rows (pos_weight); balanced = its negative / "
                            "positive rows.")
    seed: int = Field(0, description="Seed of the head's initialisation, the data order and "
                                      "dropout.")
    workers: int = Field(1, gt=0, description="Ray Train workers (one per GPU), DDP.")
    use_gpu: bool = Field(False, description="Give each worker a GPU.")
    cpus_per_worker: float = Field(
        1, gt=0, description="CPUs per worker (torch threads follow): data loading on GPU "
                             "nodes, the whole compute on CPU.")
    max_failures: int = Field(
        2, ge=0, description="Worker failures survived by restarting from the last checkpoint.")
    keep_best: bool = Field(
        True, description="With eval rows: the final model is the epoch with the best eval "
                          "accuracy (multi_label: macro-F1), not merely the last one.")
    threshold_min_support: int = Field(
        5, ge=1, description="task: multi_label: a label with fewer eval rows than this keeps "
                             "the threshold 0.5 instead of one tuned on too few rows.")
    abstain_accuracy_loss: float = Field(
        0.02, ge=0, lt=1, description="With eval rows: the abstention threshold picked (and "
                                      "written by merge, for classify's abstain.below) is the "
                                      "highest whose rows under it cost at most this share of "
                                      "eval accuracy, on calibrated confidence.")
    distance_index_rows: int = Field(
        0, ge=0, description="Keep up to this many training rows' representations in the model "
                             "folder (a class-balanced sample, float16), for classify's "
                             "abstain.score: distance, and pick its threshold on the eval rows "
                             "within abstain_accuracy_loss. Costs one forward pass over these "
                             "rows and the eval rows at the end. 0 = none. Single-label only.")
    distance_k: int = Field(
        10, gt=0, description="abstain.score: distance is the cosine distance to the k-th "
                              "nearest row of that index.")
    report_to: list[Literal["mlflow", "tensorboard", "wandb"]] = Field(
        [], description="Experiment trackers to log to (none by default): the run's config, "
                        "each epoch's metrics and the final calibration, from rank 0.")
    tracking: TrackingConfig = Field(TrackingConfig(), description="Where report_to logs.")

    @field_validator("report_to")
    @classmethod
    def _each_tracker_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"names a tracker twice: {value}")
        return value


class FinetuneOutputConfig(Section):
    path: str = Field(description="Folder for the trained adapter (or full model) and summary "
                                  "(local or s3://).")
    storage_path: str | None = Field(
        None, description="Ray Train checkpoint storage (local or s3://). None = <path>/ray.")


class FinetuneConfig(Section):
    task: TaskName = TASK
    base_model: str = Field(description="Base model folder (transformers format; local or s3://).")
    train: InputConfig
    eval: InputConfig | None = Field(None, description="Held-out rows scored after training.")
    labels: Labels = Field(
        None, description="Label set in id order. None = sorted distinct gold labels of train.")
    training: TrainingConfig = TrainingConfig()
    output: FinetuneOutputConfig
    storage: StorageConfig = StorageConfig()
    cluster: ClusterConfig = ClusterConfig()

    @field_validator("train")
    @classmethod
    def _train_has_labels(cls, value: InputConfig) -> InputConfig:
        if not value.label_column:
            raise ValueError("train.label_column is required to fine-tune")
        return value

    @model_validator(mode="after")
    def _task_fits(self) -> "FinetuneConfig":
        check_task(self.task, self.train, "train")
        if self.eval is not None:
            check_task(self.task, self.eval, "eval")
        if self.task == "multi_label" and self.training.distance_index_rows:
            raise ValueError("training.distance_index_rows is for task: single_label (abstention "
                             "is); leave it 0")
        return self


class MergeConfig(Section):
    adapter: str = Field(description="Output folder of `clsjob finetune` (local or s3://).")
    output: str = Field(description="Where the merged model folder is written (local or s3://).")
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Precision of the merged weights.")
    max_shard_size: str = Field("2GB", description="Largest safetensors file.")
    storage: StorageConfig = StorageConfig()
