"""Typed job configs: YAML + `--set key.path=value` overrides -> one frozen pydantic model.

Every field is documented where it is declared; `clsjob config classify|finetune|merge`
prints them all, with their defaults.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import re
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)


log = logging.getLogger("clsjob")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


# single_label: each row gets exactly one label; multi_label: each row gets the set of labels
# that apply (possibly none), one independent yes/no decision per label.
Task = Literal["single_label", "multi_label"]
TASK = Field("single_label", description="single_label = one label a row; multi_label = every "
                                         "label that applies, possibly none (one sigmoid per "
                                         "label, thresholds tuned on the eval rows).")


class Section(BaseModel):
    # frozen: a run never mutates its config; extra="forbid": a typo is an error, not a default.
    model_config = ConfigDict(frozen=True, extra="forbid")


class StorageConfig(Section):
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph, a test server). None = AWS.")
    region: str | None = Field(None, description="S3 region; None = the AWS chain's default.")
    max_attempts: int = Field(
        10, ge=1, description="Tries per S3 request on throttling (SlowDown), 5xx answers and "
                              "dropped connections, with exponential backoff and jitter.")
    model_cache: str = Field(
        "~/.cache/clsjob/models", description="Local folder on every node where models given "
                                              "as s3:// are fetched, once per node and model.")
    # No credential fields on purpose: keys come only from the environment or the AWS chain,
    # so they can never end up in a config file, a manifest or a log line.


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


class LabelSpec(Section):
    name: str = Field(min_length=1, description="Label name as written to the output.")
    description: str | None = Field(None, description="What the label means (for prompts).")


def _labels_from_strings(value: Any) -> Any:
    # `labels: [neg, pos]` is the common case; descriptions are optional.
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


# A label list written as plain names or as {name, description} mappings.
Labels = Annotated[list[LabelSpec] | None, BeforeValidator(_labels_from_strings)]


class Example(Section):
    text: str = Field(description="An example input.")
    label: str | list[str] = Field(description="Its label (one of the configured labels); under "
                                               "task: multi_label, a list of them (maybe empty).")


class PromptConfig(Section):
    """How `vllm_prompt` asks an LLM. Everything every row shares (system prompt,
    instructions, the label list, examples) comes before the row's text, so that vLLM's
    prefix cache computes it once."""
    mode: Literal["choice", "json", "score"] = Field(
        "choice", description="choice = the answer is forced to be exactly one label; json = "
                              "{label, reasoning} under a JSON schema; score = no sampling, "
                              "the model's probability of every label (fills probs).")
    system_prompt: str | None = Field(None, description="System message (chat models).")
    instructions: str | None = Field(
        None, description="Free-text instructions placed before the label list.")
    examples: list[Example] = Field(default_factory=list, description="Few-shot examples.")
    examples_path: str | None = Field(
        None, description="Parquet file of more few-shot examples (local or s3://).")
    examples_text_column: str = Field("text", description="Text column of examples_path.")
    examples_label_column: str = Field("label", description="Label column of examples_path.")
    max_examples: int = Field(8, ge=0, description="Cap on examples used (inline first).")
    chat_template: Literal["auto", "on", "off"] = Field(
        "auto", description="auto = the tokenizer's chat template when it has one, else a "
                            "plain completion prompt.")
    reasoning_max_chars: int = Field(
        300, gt=0, description="json mode: longest `reasoning` kept. The reasoning is whole "
                               "sentences within it (one long sentence: its whole words and "
                               "an ellipsis); the answer's token budget grows with it, one "
                               "token a character.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy, the same answer every run.")
    seed: int = Field(0, description="Sampling seed: with temperature > 0, runs still repeat.")
    temperature_scale: float = Field(
        1.0, gt=0, description="score mode: label log-probabilities are divided by it before "
                               "they are renormalised (calibration; `clsjob calibrate` fits it "
                               "on a labelled run). 1 = as the model gives them.")

    @model_validator(mode="after")
    def _scale_needs_scores(self) -> "PromptConfig":
        if self.temperature_scale != 1.0 and self.mode != "score":
            raise ValueError("backend.prompt.temperature_scale applies to mode: score only "
                             "(the other modes give no probabilities)")
        return self


class EngineConfig(Section):
    """vLLM engine settings, passed through. None = vLLM's own default."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto = bfloat16 on GPU, float32 on CPU.")
    max_model_len: int | None = Field(
        None, gt=0, description="Prompt + answer tokens per row. None = the model's maximum. "
                                "vllm_prompt: one that leaves a row no room beside the shared "
                                "prompt and the answer is refused on the driver.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="GPU memory share for weights and KV cache (GPU only).")
    kv_cache_gib: float | None = Field(
        None, gt=0, description="KV cache size in GiB. None = from gpu_memory_utilization on "
                                "GPU, 1 GiB on CPU (where that share is of one NUMA node).")
    tensor_parallel_size: int = Field(
        1, gt=0, description="GPUs one engine splits each layer over. The actor is given "
                             "tensor_parallel_size x pipeline_parallel_size GPUs, one "
                             "placement-group bundle each, on one node.")
    pipeline_parallel_size: int = Field(
        1, gt=0, description="GPUs one engine splits its layers over, in stages.")
    max_num_seqs: int | None = Field(None, gt=0, description="Sequences per engine step.")
    max_num_batched_tokens: int | None = Field(None, gt=0, description="Tokens per step.")
    enable_prefix_caching: bool = Field(True, description="Reuse the shared prompt prefix.")
    block_size: int | None = Field(
        None, gt=0, description="KV cache block (tokens): the prefix cache reuses whole blocks "
                                "only. None = vLLM's default, except 32 for prompted engines on "
                                "CPU, whose default of 128 caches nothing of a shorter prompt.")
    structured_outputs_backend: Literal["guidance", "xgrammar", "outlines", "auto"] = Field(
        "guidance", description="Constrained decoding library. guidance by default: on labels "
                                "that are prefixes of others, outlines stops at the shortest "
                                "and xgrammar allows non-canonical tokenisations.")
    enforce_eager: bool | None = Field(
        None, description="Skip graph capture/compilation. None = on for CPU (start-up), off "
                          "for GPU (CUDA graphs).")


class BackendSection(Section):
    """Settings every back end has. Each back end is one subclass holding only its own
    settings, told apart by `kind`."""
    model: str = Field(description="Model folder (safetensors + tokenizer); local, or s3:// "
                                    "fetched once per node into storage.model_cache.")
    max_length: int = Field(512, gt=0, description="Tokens of a row's text; longer rows are "
                                                   "truncated and flagged.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped in the model folder. Off unless you trust it.")


# hf and vllm_pool: whether the temperature the model folder carries is applied.
CALIBRATED = Field(True, description="Apply the temperature `clsjob finetune` fitted on its eval "
                                     "rows (config.json's clsjob_temperature, written by merge): "
                                     "probs = softmax(logits / T). false = the raw softmax.")


class HFBackendConfig(BackendSection):
    kind: Literal["hf"] = Field(
        "hf", description="hf = merged *ForSequenceClassification folder via transformers; "
                          "vllm_pool = the same folder via vLLM's pooling runner; vllm_prompt "
                          "= a generative LLM, prompted, under constrained decoding.")
    micro_batch_size: int = Field(
        32, gt=0, description="Rows per forward pass, length-sorted within each batch.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="What the model runs in. auto = bfloat16 where the hardware "
                            "multiplies it natively (GPUs from Ampere on; CPUs with AVX-512 "
                            "BF16 or AMX), float16 on older GPUs, float32 on other CPUs. Each "
                            "part's choice is in the manifest.")
    calibrated: bool = CALIBRATED


class VLLMPoolBackendConfig(BackendSection):
    kind: Literal["vllm_pool"] = "vllm_pool"
    calibrated: bool = CALIBRATED
    engine: EngineConfig = Field(default_factory=EngineConfig,
                                 description="vLLM engine settings.")

    @model_validator(mode="after")
    def _text_fits_the_engine(self) -> "VLLMPoolBackendConfig":
        limit = self.engine.max_model_len
        if limit and self.max_length > limit:
            raise ValueError("backend.max_length must not exceed backend.engine.max_model_len")
        return self


class VLLMPromptBackendConfig(BackendSection):
    kind: Literal["vllm_prompt"] = "vllm_prompt"
    prompt: PromptConfig = Field(default_factory=PromptConfig,
                                 description="How the LLM is asked.")
    engine: EngineConfig = Field(default_factory=EngineConfig,
                                 description="vLLM engine settings.")


BACKEND_CONFIGS = (HFBackendConfig, VLLMPoolBackendConfig, VLLMPromptBackendConfig)


def _kind_defaults_to_hf(value: Any) -> Any:
    # `kind` may be left out (the hf back end), yet a discriminated union needs it to choose.
    if isinstance(value, dict) and "kind" not in value:
        return {**value, "kind": "hf"}
    return value


# One back end's settings, chosen by `kind`: a setting of another back end is an unknown key.
BackendConfig = Annotated[Union[BACKEND_CONFIGS], Field(discriminator="kind"),
                          BeforeValidator(_kind_defaults_to_hf)]


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


def stage_backends(backend) -> list[tuple[str, BackendSection]]:
    """(config key, back end) of each stage that labels rows: the back end itself, or each
    stage of a cascade."""
    if backend.kind == "cascade":
        return [(f"backend.stages[{i}].backend", s.backend) for i, s in enumerate(backend.stages)]
    return [("backend", backend)]


def gives_confidence(backend: BackendSection) -> bool:
    return backend.kind != "vllm_prompt" or backend.prompt.mode == "score"


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
    """Rows the model is not sure of get a fallback label (or none) instead of a guess."""
    label: str | None = Field(
        None, description="The fallback label for rows under the threshold (not one of the "
                          "model's labels; the metrics score it as one more class). None = "
                          "no label, and the error `below confidence threshold <below>`.")
    below: float | None = Field(
        None, gt=0, le=1, description="Confidence threshold (calibrated, when the model is). "
                                      "None = the one `clsjob finetune` picked on its eval rows "
                                      "(config.json's clsjob_abstain_below; hf and vllm_pool).")


class ClassifyConfig(Section):
    task: Task = TASK
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
            for key, b in stage_backends(self.backend):
                lists = [i for i, ex in enumerate(getattr(b, "prompt", PromptConfig()).examples)
                         if isinstance(ex.label, list)]
                if lists:
                    raise ValueError(f"{key}.prompt.examples[{lists[0]}].label: a list of labels "
                                     f"is for task: multi_label; give one label")
            return self
        # Not built for sets of labels yet: each would need its own rule for a set.
        review = self.output.review
        unsupported = [(self.backend.kind == "cascade", "backend.kind cascade"),
                       (self.abstain is not None, "abstain"),
                       (review is not None and review.strategy != "least_confident",
                        f"output.review.strategy {review and review.strategy} (least_confident is)"),
                       (review is not None and review.per_label, "output.review.per_label")]
        for found, key in unsupported:
            if found:
                raise ValueError(f"{key} is not supported with task: multi_label")
        b = self.backend
        if b.kind == "vllm_prompt" and b.prompt.mode == "choice":
            raise ValueError("backend.prompt.mode choice forces exactly one label; task: "
                             "multi_label needs mode json (a list of labels) or score (a yes/no "
                             "probability per label)")
        return self

    @model_validator(mode="after")
    def _review_needs_probabilities(self) -> "ClassifyConfig":
        for key, b in stage_backends(self.backend):
            if self.output.review and not gives_confidence(b):
                raise ValueError(f"output.review: {key}.prompt.mode {b.prompt.mode} gives no "
                                 f"probabilities to rank rows by; use mode: score")
        return self

    @model_validator(mode="after")
    def _abstention_needs_confidence(self) -> "ClassifyConfig":
        if self.abstain is None:
            return self
        for key, b in stage_backends(self.backend):
            if not gives_confidence(b):
                raise ValueError(f"abstain: {key}.prompt.mode {b.prompt.mode} gives no "
                                 f"confidence to abstain on; use mode: score")
        if self.backend.kind in ("vllm_prompt", "cascade") and self.abstain.below is None:
            raise ValueError(f"abstain.below: a {self.backend.kind} back end needs a threshold "
                             f"(only a fine-tuned model folder carries one)")
        if self.abstain.label is not None and self.labels and \
                self.abstain.label in [spec.name for spec in self.labels]:
            raise ValueError(f"abstain.label {self.abstain.label!r} is one of the labels; the "
                             f"fallback must be a label the model does not give")
        return self

    @model_validator(mode="after")
    def _prompted_needs_labels(self) -> "ClassifyConfig":
        for key, b in stage_backends(self.backend):
            if b.kind == "vllm_prompt" and not self.labels:
                raise ValueError(f"labels: vllm_prompt ({key}) needs the label list (its model "
                                 f"has no id2label to take them from)")
        return self

    @model_validator(mode="after")
    def _gpus_fit_the_back_end(self) -> "ClassifyConfig":
        if self.backend.kind != "cascade":
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

    def stages(self) -> list[tuple[str, BackendSection, ResourcesConfig]]:
        """(name, back end, actor pool) of each stage; one, named by its kind, without a cascade."""
        b = self.backend
        if b.kind != "cascade":
            return [(b.kind, b, self.resources)]
        return [(name, s.backend, s.resources) for name, s in zip(b.stage_names(), b.stages)]


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
    task: Task = TASK
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
        return self


class MergeConfig(Section):
    adapter: str = Field(description="Output folder of `clsjob finetune` (local or s3://).")
    output: str = Field(description="Where the merged model folder is written (local or s3://).")
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Precision of the merged weights.")
    max_shard_size: str = Field("2GB", description="Largest safetensors file.")
    storage: StorageConfig = StorageConfig()


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
        if t.kind == "vllm_prompt" and not self.labels:
            raise ValueError("labels: a vllm_prompt teacher needs the label list")
        if not gives_confidence(t) and self.student.min_teacher_confidence is not None:
            raise ValueError(f"student.min_teacher_confidence: teacher.backend.prompt.mode "
                             f"{t.prompt.mode} gives no confidence; use mode: score")
        problem = gpu_mismatch(t, self.teacher.resources)
        if problem:
            raise ValueError(f"teacher: {problem}")
        return self


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set `a.b.c=value` pairs into a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return data


DATE_TEMPLATE = re.compile(r"\{date([+-]\d+)?(?::([^}]*))?\}")


def fill_dates(data: Any, day: date | None, key: str = "") -> Any:
    """Replace `{date}` (ISO, 2026-11-29) and `{date:<strftime>}` (e.g. `{date:%Y/%m/%d}`) in
    every string of the config: one config file serves every day of a nightly schedule. An
    offset in days names another day: `{date-1}` is the day before (monitor.baseline)."""
    if isinstance(data, dict):
        return {k: fill_dates(v, day, f"{key}.{k}" if key else k) for k, v in data.items()}
    if isinstance(data, list):
        return [fill_dates(v, day, f"{key}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, str) and DATE_TEMPLATE.search(data):
        if day is None:
            raise ConfigError(f"{key}: {data!r} holds a date template; pass --date YYYY-MM-DD")
        def fill(m: re.Match) -> str:
            when = day + timedelta(days=int(m[1] or 0))
            return when.strftime(m[2]) if m[2] else when.isoformat()
        return DATE_TEMPLATE.sub(fill, data)
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), *, model: type[Section],
                day: date | None = None):
    """Read YAML (or start empty), apply overrides, fill date templates, validate; errors name
    file and key."""
    source = str(path) if path else "<overrides>"
    data: dict = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping")
    data = fill_dates(apply_overrides(data, list(overrides)), day)
    return validate(data, model=model, source=source)


def validate(data: dict, *, model: type[Section], source: str = "<config>"):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid {model.__name__}:"]
        lines += [f"  {key}: {msg}" for key, msg in map(explain, exc.errors())]
        raise ConfigError("\n".join(lines)) from None


BACKEND_KINDS = tuple(c.model_fields["kind"].default for c in BACKEND_CONFIGS)


def explain(err: dict) -> tuple[str, str]:
    """(dotted key, message) of one validation error, in the words of the config file: the
    back end chosen by `kind` is named in the message, not spliced into the key."""
    loc, kind = [], None
    for part in err["loc"]:
        if part in BACKEND_KINDS and loc and loc[-1] == "backend":
            kind = part  # pydantic's tag of the union member
            continue
        loc.append(str(part))
    key = ".".join(loc) or "(top level)"
    if err["type"] == "union_tag_invalid":
        return f"{key}.kind", (f"{err['ctx']['tag']!r} is not a back end "
                               f"(one of {', '.join(BACKEND_KINDS)})")
    if err["type"] == "extra_forbidden":
        return key, "unknown key" + (f" for backend.kind {kind}" if kind else "")
    return key, err["msg"]


def config_hash(cfg: Section, exclude: set[str] | dict | None = None) -> str:
    """Stable short hash of the validated config (less the `exclude` sections), recorded in
    every manifest."""
    return hashlib.sha256(cfg.model_dump_json(exclude=exclude).encode()).hexdigest()[:16]


def field_reference(model: type[Section], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) of every setting of `model`, nested sections
    walked; lists of sections (labels, examples) are settings of their own. The settings of a
    union of sections (the back ends) are listed once each, marked with the kinds that have
    them where not all do."""
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + name
        # A section, an optional one (eval) or a union of them; a list of sections is one setting.
        kinds = () if get_origin(field.annotation) is list else (
            get_args(field.annotation) or (field.annotation,))
        sections = [t for t in kinds if isinstance(t, type) and issubclass(t, Section)]
        if len(sections) > 1:
            rows += union_reference(sections, key + ".")
        elif sections:
            rows += field_reference(sections[0], key + ".")
        else:
            rows.append((key, default_text(field), field.description or ""))
    return rows


def union_reference(members: list[type[Section]], prefix: str) -> list[tuple[str, str, str]]:
    owners: dict[str, list[str]] = {}
    rows: dict[str, tuple[str, str, str]] = {}
    for member in members:
        for key, default, text in field_reference(member, prefix):
            owners.setdefault(key, []).append(member.model_fields["kind"].default)
            rows.setdefault(key, (key, default, text))
    every = len(members)
    kind_first = sorted(rows.values(), key=lambda row: not row[0].endswith(".kind"))
    return [(key, default, text if len(owners[key]) == every or key.endswith(".kind")
             else f"({', '.join(owners[key])}) {text}")
            for key, default, text in kind_first]


def default_text(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is list:
        return "[]"
    return yaml.safe_dump(field.default).strip().removesuffix("...").strip()
