"""`clsjob distill`'s config: teacher, student, the sample the teacher labels, the gate."""
from __future__ import annotations

from pydantic import Field, model_validator

from clsjob.config.backend import BackendConfig
from clsjob.config.base import Labels, Section, StorageConfig
from clsjob.config.classify import (ClusterConfig, InputConfig, ResourcesConfig,
                                     gpu_mismatch)
from clsjob.config.finetune import TrainingConfig


class DistillTeacherConfig(Section):
    backend: BackendConfig = Field(description="The teacher's back end (usually vllm_prompt).")
    resources: ResourcesConfig = Field(ResourcesConfig(), description="The teacher's actor pool.")


class DistillStudentConfig(Section):
    base_model: str = Field(description="The student's base model folder (local or s3://).")
    training: TrainingConfig = Field(TrainingConfig(), description="How the student is trained "
                                                                   "(the fine-tune settings).")
    min_teacher_confidence: float | None = Field(
        None, gt=0, le=1, description="Train only on sample rows the teacher labelled with at "
                                      "least this confidence (the teacher must give one).")
    resources: ResourcesConfig = Field(ResourcesConfig(), description="The student's classify "
                                                                      "actor pool.")


class DistillSampleConfig(Section):
    rows: int | None = Field(None, gt=1, description="Rows the teacher labels, drawn at random.")
    fraction: float | None = Field(None, gt=0, le=1, description="Or this share of the corpus.")
    seed: int = Field(0, description="Seed of the draw and of the held-out split.")
    heldout_fraction: float = Field(0.2, gt=0, lt=1, description="Share of the labelled sample "
                                                                 "held out to judge the student.")
    rows_per_shard: int = Field(256, gt=0, description="Rows of each sample file. The teacher's "
                                                       "step resumes at the first file it had not "
                                                       "finished: a slow teacher stopped mid-step "
                                                       "redoes at most this many rows.")

    @model_validator(mode="after")
    def _one_size(self) -> "DistillSampleConfig":
        if (self.rows is None) == (self.fraction is None):
            raise ValueError("sample: set exactly one of rows, fraction")
        return self


class DistillGateConfig(Section):
    min_agreement: float = Field(gt=0, le=1, description="The student alone must agree with the "
                                                         "teacher on this share of the held-out "
                                                         "rows, or distill stops (exit 2).")
    min_accuracy: float | None = Field(None, gt=0, le=1, description="With gold labels: and "
                                                                     "reach this accuracy on them.")
    cascade_agreement: float = Field(
        0.98, gt=0, le=1, description="label_corpus: the escalation threshold is the lowest whose "
                                      "cascade agrees with the teacher on this share of the "
                                      "held-out rows.")


class DistillOutputConfig(Section):
    path: str = Field(description="The run folder: every step's output lands here (local or s3://).")


class DistillConfig(Section):
    input: InputConfig = Field(description="The corpus (gold labels optional).")
    labels: Labels = Field(None, description="Label names in output order (required for a "
                                             "vllm_prompt teacher).")
    teacher: DistillTeacherConfig
    student: DistillStudentConfig
    sample: DistillSampleConfig
    gate: DistillGateConfig
    label_corpus: bool = Field(False, description="After the gate: label the whole corpus with "
                                                  "a cascade of the student and the teacher.")
    output: DistillOutputConfig
    storage: StorageConfig = StorageConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _teacher_fits(self) -> "DistillConfig":
        t = self.teacher.backend
        if t.needs_labels and not self.labels:
            raise ValueError(f"labels: a {t.kind} teacher needs the label list")
        if not t.gives_confidence and self.student.min_teacher_confidence is not None:
            raise ValueError(f"student.min_teacher_confidence: teacher.backend.prompt.mode "
                             f"{t.prompt.mode} gives no confidence; use mode: score")
        problem = gpu_mismatch(t, self.teacher.resources)
        if problem:
            raise ValueError(f"teacher: {problem}")
        return self
