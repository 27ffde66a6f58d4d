"""`clsjob classify`'s config: input, resources, the cascade, review, output, monitoring,
abstention, and the checks across sections."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, field_validator, model_validator

from clsjob.config.backend import (BACKEND_CONFIGS, BackendConfig, BackendSection, PromptConfig,
                                    _kind_defaults_to_hf)
from clsjob.config.base import TASK, Labels, Section, StorageConfig, TaskName

log = logging.getLogger("clsjob")

# output.parts_per_call left out, on a GPU (ClassifyConfig.parts_per_call).
GPU_PARTS_PER_CALL = 8


class InputConfig(Section):
    path: str | list[str] = Field(
        description="Parquet shards: a folder, a glob, one file, or a list of files; local, "
                    "file:// or s3://.")
    text_column: str = Field("text", description="Column holding the text to classify.")
    id_column: str | None = Field(
        None, description="Column with a unique row id. None = derive '<shard>:<row>'.")
    label_column: str | None = Field(
        None, description="Column with gold labels; enables evaluation. task: multi_label: a "
                          "list<string> column, or a string column with label_separator.")
    label_separator: str | None = Field(
        None, min_length=1, description="task: multi_label: the gold labels are one string "
                                        "joined by this (e.g. '|'); an empty string = none apply.")
    carry_columns: list[str] = Field(
        default_factory=list, description="Extra input columns copied to the output unchanged.")
    on_duplicate_ids: Literal["report", "fail"] = Field(
        "report", description="Values of id_column that occur more than once: label every row "
                              "and list them in the manifest, or fail before labelling.")
    on_bad_file: Literal["fail", "skip"] = Field(
        "fail", description="A corrupt, truncated or empty Parquet file: fail naming it, or "
                            "skip it and list it in the manifest.")


class EvaluateConfig(Section):
    target_accuracy: float | None = Field(
        None, gt=0, le=1, description="With gold labels: the accuracy the rows kept should reach; "
                                      "the metrics then name the lowest confidence threshold "
                                      "whose rows reach it, and the share of rows it keeps.")


class ClusterConfig(Section):
    autoscaling: bool = Field(
        False, description="The cluster adds nodes on demand (the shipped cluster.yaml, KubeRay "
                           "with autoscaling): actors or workers that do not fit the nodes up "
                           "at start are waited for, with a warning. Off: such a job is "
                           "refused at start, naming the resources.* keys and the nodes.")
    stall_report_s: float = Field(
        120, gt=0, description="When nothing has finished for this long, the log says what the "
                               "job is waiting for (resources asked for and free), and again "
                               "every this many seconds.")


class ResourcesConfig(Section):
    actors: int | tuple[int, int] = Field(
        1, description="Classifier actors (one model copy each): N, or [min, max] for a pool "
                       "Ray Data grows while chunks queue and shrinks when idle; the job starts "
                       "once min fit.")

    @field_validator("actors", mode="before")
    @classmethod
    def _count_or_range(cls, value):
        def count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(count, value)) \
                and value[0] <= value[1]:
            return tuple(value)
        if count(value):
            return value
        raise ValueError(f"expected N or [min, max] with 0 < min <= max, got {value!r}")

    def actor_range(self) -> tuple[int, int]:
        return self.actors if isinstance(self.actors, tuple) else (self.actors, self.actors)
    gpus_per_actor: float = Field(0, ge=0, description="GPUs per actor; 0 runs on CPU in fp32.")
    cpus_per_actor: float = Field(1, gt=0, description="CPUs per actor (torch threads follow).")
    calls_per_actor: int = Field(
        2, ge=1, le=8, description="Chunks an actor works on at once: while the model labels "
                                   "one, the next is read and tokenised beside it (and a vLLM "
                                   "engine takes its rows before the first is done). 1 = one "
                                   "chunk after another.")


class CascadeStageConfig(Section):
    """One stage of a cascade: a back end with its own actor pool, and (all but the last) the
    rule that sends a row on to the next stage."""
    name: str | None = Field(None, min_length=1, description="The stage's name in `labelled_by`, "
                                                             "the manifest and the report. None "
                                                             "= <position>-<backend kind>.")
    backend: BackendConfig = Field(description="The stage's back end (hf, vllm_pool or "
                                               "vllm_prompt; the same settings as backend).")
    resources: ResourcesConfig = Field(ResourcesConfig(), description="The stage's actor pool.")
    escalate_below: float | None = Field(
        None, gt=0, le=1, description="Rows this stage labels with a confidence under it go on "
                                      "to the next stage (calibrated where the model is).")
    escalate_margin_below: float | None = Field(
        None, gt=0, le=1, description="Or: rows whose top-1 minus top-2 probability is under it.")


class CascadeBackendConfig(Section):
    kind: Literal["cascade"] = Field("cascade", description="Stages in order: each labels the "
                                                            "rows the one before escalated.")
    stages: list[CascadeStageConfig] = Field(min_length=2, description="Two or more stages.")

    @model_validator(mode="after")
    def _each_stage_but_the_last_escalates(self) -> "CascadeBackendConfig":
        for i, stage in enumerate(self.stages):
            rules = [r for r in ("escalate_below", "escalate_margin_below") if getattr(stage, r) is not None]
            key = f"backend.stages[{i}]"
            if i == len(self.stages) - 1:
                if rules:
                    raise ValueError(f"{key}.{rules[0]}: the last stage has no stage to escalate to")
                continue
            if len(rules) != 1:
                raise ValueError(f"{key}: set one of escalate_below, escalate_margin_below")
            b = stage.backend
            if b.kind == "vllm_prompt" and b.prompt.mode != "score":
                raise ValueError(f"{key}.backend.prompt.mode {b.prompt.mode} gives no confidence "
                                 f"to escalate on; use mode: score (or make it the last stage)")
        names = self.stage_names()
        if len(set(names)) != len(names):
            raise ValueError(f"backend.stages: names must differ, got {names}")
        return self

    def stage_names(self) -> list[str]:
        return [s.name or f"{i + 1}-{s.backend.kind}" for i, s in enumerate(self.stages)]


# classify's back end: one of the three, or a cascade of them.
ClassifyBackendConfig = Annotated[Union[(*BACKEND_CONFIGS, CascadeBackendConfig)],
                                  Field(discriminator="kind"), BeforeValidator(_kind_defaults_to_hf)]


# The output's section of a run with more than one stage (the manifest's and the metrics').
CASCADE = "cascade"


@dataclass(frozen=True)
class Stage:
    """One actor pool that labels rows: a run's one back end, or a stage of a cascade. Every
    run is a list of them (ClassifyConfig.stages); only a stage that escalates has a rule."""
    name: str
    key: str  # its config key: "" for the one back end, else "backend.stages[i]."
    backend: BackendSection
    resources: ResourcesConfig
    escalate_below: float | None = None
    escalate_margin_below: float | None = None


# Review candidates travel as JSON with each part's record and live in the shard markers.
MAX_REVIEW_ROWS = 100_000


class ReviewConfig(Section):
    """Rows a person should label first, written to `_review/review.parquet`."""
    rows: int | None = Field(None, gt=0, le=MAX_REVIEW_ROWS, description="How many rows (per "
                                                                         "label with per_label).")
    fraction: float | None = Field(None, gt=0, le=1, description="Or this share of the run's "
                                                                 "rows (at most 100,000).")
    strategy: Literal["least_confident", "margin", "entropy"] = Field(
        "least_confident", description="least_confident = lowest top probability first; "
                                       "margin = smallest gap between the top two; entropy = "
                                       "most spread-out probabilities. Ties: by id.")
    per_label: bool = Field(False, description="Pick `rows` for each predicted label.")

    @model_validator(mode="after")
    def _one_size(self) -> "ReviewConfig":
        if (self.rows is None) == (self.fraction is None):
            raise ValueError("output.review: set exactly one of rows and fraction")
        return self


class OutputConfig(Section):
    path: str = Field(description="Output folder (local or s3://) for parts and reports.")
    rows_per_part: int = Field(
        1024, gt=0, description="Rows of one output part, read, labelled (one actor call) and "
                                "written whole. Part of what decides the rows written: a rerun "
                                "with another value is another run.")
    parts_per_call: int | None = Field(
        None, ge=1, le=64, description="Parts of one shard handed to a back-end call together: "
                                       "hf sorts their rows by length as one, so its "
                                       "micro-batches pad less. Each part is still written "
                                       "whole under its own name. None = 8 where the (first) "
                                       "stage has GPUs, else 1.")
    keep_text: bool = Field(True, description="Copy the text column into the output.")
    review: ReviewConfig | None = Field(
        None, description="Rows for review (active learning): off unless set.")
    overwrite: bool = Field(
        False, description="Redo the run from scratch. Off: a rerun resumes unfinished work "
                           "and a finished run is left as it is.")
    stale_lock_after_s: float = Field(
        600, gt=0, description="A run holds `_lock.json` in the output folder and refreshes it "
                               "(every tenth of this, at most a minute); a lock not refreshed "
                               "for this long belongs to a run that is gone and is taken over.")


class DriftLimits(Section):
    psi: float | None = Field(None, gt=0, description="Population stability index of the label "
                                                      "distribution (0.2 is the usual alarm).")
    js: float | None = Field(None, gt=0, le=1, description="Jensen-Shannon divergence (base 2) of "
                                                           "the label distribution.")
    mean_confidence_shift: float | None = Field(
        None, gt=0, description="Largest change of the mean confidence, either way.")


class MonitorConfig(Section):
    """Label drift against an earlier run. Not part of the work hash: it changes no row."""
    baseline: str | None = Field(
        None, description="An earlier run's output folder (local or s3://), or a {date} "
                          "template with an offset, e.g. .../date={date-1:%Y%m%d}/ for the day "
                          "before. None = no comparison (the distribution is still recorded).")
    below: float = Field(0.5, gt=0, le=1, description="The review threshold: the share of rows "
                                                      "under it is compared too.")
    fail_above: DriftLimits = Field(
        default_factory=DriftLimits, description="Limits past which the run exits with code 3, "
                                                 "after writing every output, so a scheduler alerts.")


class AbstainConfig(Section):
    """Rows the model is not sure of, or that lie far from what it was trained on, get a
    fallback label (or none) instead of a guess."""
    score: Literal["confidence", "distance"] = Field(
        "confidence", description="What decides: confidence (under `below`), or distance "
                                  "(`ood_score` over `above`: the row's cosine distance to "
                                  "its k-th nearest training row, in the fine-tuned model's "
                                  "representation; hf, with a model fine-tuned with "
                                  "training.distance_index_rows).")
    distance: Literal["knn", "mahalanobis"] | None = Field(
        None, description="score: distance: knn = the cosine distance to the k-th nearest "
                          "training row (0 to 2); mahalanobis = the distance to the nearest "
                          "class mean under the covariance the classes share (0 up), better "
                          "where few of the traffic's intents are known (bench/RESULTS.md). "
                          "Both are in a folder fine-tuned with training.distance_index_rows. "
                          "None = knn.")
    label: str | None = Field(
        None, description="The fallback label for rows the rule abstains on: one more class "
                          "in the metrics, or one of the model's own (an 'out of scope' class "
                          "it was trained with), scored as that class. None = no label, and "
                          "the error `below confidence threshold <below>` (or `over distance "
                          "threshold <above>`).")
    below: float | None = Field(
        None, gt=0, le=1, description="score: confidence: the threshold (calibrated, when the "
                                      "model is). None = the one `clsjob finetune` picked on its "
                                      "eval rows (config.json's clsjob_abstain_below; hf and "
                                      "vllm_pool).")
    above: float | None = Field(
        None, ge=0, description="score: distance: the threshold on ood_score (knn: 0 to 2). "
                                "None = the one `clsjob finetune` picked on its eval rows "
                                "(config.json's clsjob_distance).")

    @model_validator(mode="after")
    def _threshold_fits_the_score(self) -> "AbstainConfig":
        if self.score == "distance" and self.below is not None:
            raise ValueError("abstain.below is a confidence threshold; score: distance takes "
                             "abstain.above")
        if self.score == "confidence" and self.above is not None:
            raise ValueError("abstain.above is a distance threshold; set score: distance, or "
                             "use abstain.below")
        if self.score == "confidence" and self.distance is not None:
            raise ValueError(f"abstain.distance {self.distance} applies to score: distance")
        if self.distance_kind() == "knn" and self.above is not None and self.above > 2:
            raise ValueError(f"abstain.above {self.above}: a cosine distance (distance: knn) "
                             f"is between 0 and 2")
        return self

    def distance_kind(self) -> str:
        """score: distance's distance: knn unless the config names mahalanobis."""
        return self.distance or "knn"


class ClassifyConfig(Section):
    task: TaskName = TASK
    input: InputConfig
    labels: Labels = Field(
        None, description="Label names in output order. None = the model's id2label "
                          "(required for vllm_prompt, whose model has no label head).")
    backend: ClassifyBackendConfig
    resources: ResourcesConfig = ResourcesConfig()
    output: OutputConfig
    storage: StorageConfig = StorageConfig()
    cluster: ClusterConfig = ClusterConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    abstain: AbstainConfig | None = Field(
        None, description="Abstention for rows that fit no label: off unless set.")
    monitor: MonitorConfig = MonitorConfig()

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        return rename_keys(data, RENAMED_CLASSIFY_KEYS)

    @model_validator(mode="after")
    def _task_fits(self) -> "ClassifyConfig":
        check_task(self.task, self.input, "input")
        if self.task == "single_label":
            for stage in self.stages():
                lists = [i for i, ex in enumerate(getattr(stage.backend, "prompt", PromptConfig()).examples)
                         if isinstance(ex.label, list)]
                if lists:
                    raise ValueError(f"{stage.key}backend.prompt.examples[{lists[0]}].label: a list "
                                     f"of labels is for task: multi_label; give one label")
            return self
        # Not built for sets of labels yet: each would need its own rule for a set.
        review = self.output.review
        unsupported = [(self.backend.kind == CASCADE, "backend.kind cascade"),
                       (self.abstain is not None, "abstain"),
                       (review is not None and review.strategy != "least_confident",
                        f"output.review.strategy {review and review.strategy} (least_confident is)"),
                       (review is not None and review.per_label, "output.review.per_label")]
        for found, key in unsupported:
            if found:
                raise ValueError(f"{key} is not supported with task: multi_label")
        if getattr(self.backend, "prompt", PromptConfig()).shots is not None:
            raise ValueError("backend.prompt.shots is not supported with task: multi_label "
                             "(a shot's answer is one label)")
        b = self.backend
        if b.kind == "vllm_prompt" and b.prompt.mode == "choice":
            raise ValueError("backend.prompt.mode choice forces exactly one label; task: "
                             "multi_label needs mode json (a list of labels) or score (a yes/no "
                             "probability per label)")
        return self

    @model_validator(mode="after")
    def _review_needs_probabilities(self) -> "ClassifyConfig":
        for stage in self.stages():
            if self.output.review and not stage.backend.gives_confidence:
                raise ValueError(f"output.review: {stage.key}backend.prompt.mode "
                                 f"{stage.backend.prompt.mode} gives no probabilities to rank "
                                 f"rows by; use mode: score")
        return self

    @model_validator(mode="after")
    def _abstention_needs_confidence(self) -> "ClassifyConfig":
        if self.abstain is None:
            return self
        stages = self.stages()
        for stage in stages:
            if not stage.backend.gives_confidence:
                raise ValueError(f"abstain: {stage.key}backend.prompt.mode {stage.backend.prompt.mode} "
                                 f"gives no confidence to abstain on; use mode: score")
        if self.abstain.score == "distance":
            if len(stages) > 1 or not stages[0].backend.gives_representation:
                raise ValueError(f"abstain.score: distance needs a row's representation, which "
                                 f"only backend.kind hf gives (not {self.backend.kind}); use "
                                 f"hf, or score: confidence")
            return self
        # Only one fine-tuned classifier's folder carries a threshold to abstain under.
        folder_threshold = len(stages) == 1 and stages[0].backend.serves_classifier
        if not folder_threshold and self.abstain.below is None:
            raise ValueError(f"abstain.below: a {self.backend.kind} back end needs a threshold "
                             f"(only a fine-tuned model folder carries one)")
        return self

    @model_validator(mode="after")
    def _prompted_needs_labels(self) -> "ClassifyConfig":
        for stage in self.stages():
            if stage.backend.needs_labels and not self.labels:
                raise ValueError(f"labels: {stage.backend.kind} ({stage.key}backend) needs the "
                                 f"label list (its model has no id2label to take them from)")
        return self

    @model_validator(mode="after")
    def _gpus_fit_the_back_end(self) -> "ClassifyConfig":
        if self.backend.kind != CASCADE:
            problem = gpu_mismatch(self.backend, self.resources)
            if problem:
                raise ValueError(problem)
            return self
        if "resources" in self.model_fields_set:
            raise ValueError("resources: a cascade's actor pools are per stage "
                             "(backend.stages[i].resources); remove the top-level resources")
        for i, stage in enumerate(self.backend.stages):
            problem = gpu_mismatch(stage.backend, stage.resources)
            if problem:
                raise ValueError(f"backend.stages[{i}]: {problem}")
        return self

    def parts_per_call(self) -> int:
        """output.parts_per_call, else by device. On a GPU, 128-row micro-batches sorted
        within one 1,024-row part compute 16-30% padding on short texts, within 8 parts 4-6%
        (bench/RESULTS.md, Padding); on a CPU, 32-row micro-batches pad 4-8% within one part,
        and a smaller call keeps two CPU actors evenly busy on a small input."""
        if self.output.parts_per_call is not None:
            return self.output.parts_per_call
        return GPU_PARTS_PER_CALL if self.stages()[0].resources.gpus_per_actor > 0 else 1

    def stages(self) -> list[Stage]:
        """The run's stages in order: one, named by its kind, or each stage of a cascade."""
        b = self.backend
        if b.kind != CASCADE:
            return [Stage(b.kind, "", b, self.resources)]
        return [Stage(name, f"backend.stages[{i}].", s.backend, s.resources, s.escalate_below,
                      s.escalate_margin_below)
                for i, (name, s) in enumerate(zip(b.stage_names(), b.stages))]


def check_task(task: str, inp: InputConfig, key: str) -> None:
    """The gold label settings fit the task (the column's type is checked on each file)."""
    if task == "single_label" and inp.label_separator is not None:
        raise ValueError(f"{key}.label_separator applies to task: multi_label only")


def engine_gpus(backend: BackendSection) -> int | None:
    """GPUs one vLLM engine spans (None for hf, which runs on one device)."""
    engine = getattr(backend, "engine", None)
    return engine.tensor_parallel_size * engine.pipeline_parallel_size if engine else None


def gpu_mismatch(backend: BackendSection, resources: ResourcesConfig) -> str | None:
    """Why resources.gpus_per_actor contradicts what the back end can use, naming both keys;
    None when they agree. A GPU an actor holds but cannot use is one no other actor gets."""
    asked = resources.gpus_per_actor
    spans = engine_gpus(backend)
    if spans is None:
        if asked > 1:
            return (f"resources.gpus_per_actor {asked:g}: backend.kind hf runs one model copy "
                    f"on one GPU; use resources.actors for more GPUs, or vllm_pool with "
                    f"backend.engine.tensor_parallel_size for a model that needs several")
        return None
    product = (f"backend.engine.tensor_parallel_size {backend.engine.tensor_parallel_size} x "
               f"backend.engine.pipeline_parallel_size {backend.engine.pipeline_parallel_size}")
    if spans > 1 and asked != spans:
        return (f"resources.gpus_per_actor {asked:g} contradicts {product} = {spans} GPUs per "
                f"engine; set resources.gpus_per_actor: {spans}")
    if spans == 1 and asked > 1:
        return (f"resources.gpus_per_actor {asked:g} but {product} = 1 GPU per engine; set "
                f"backend.engine.tensor_parallel_size: {asked:g} to use them, or "
                f"resources.gpus_per_actor: 1")
    return None


# Keys that moved, old -> new: old configs still load, with a warning naming both.
RENAMED_CLASSIFY_KEYS = {"resources.batch_size": "output.rows_per_part"}


def rename_keys(data: Any, renamed: dict[str, str]) -> Any:
    if not isinstance(data, dict):
        return data
    data = copy.deepcopy(data)
    for old, new in renamed.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = data.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        value = section.pop(old_key)
        target = data.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # the new section's own error says what is wrong with it
        if new_key in target and target[new_key] != value:
            raise ValueError(f"{old} ({value}) is the old name of {new} ({target[new_key]}); "
                             f"set only {new}")
        target[new_key] = value
        log.warning("config: %s is deprecated, renamed %s; reading it as %s: %s",
                    old, new, new, value)
    return data
