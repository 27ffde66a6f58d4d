"""Classification back ends. Each is a Ray Data actor class: a heavy `__init__` that loads the
model once, and a thin `__call__(chunk) -> chunk` over pure functions in the same module.

REGISTRY maps a `backend.kind` to its config model, the check run on the driver before any
row is read, and its actor; a new back end is one entry here and one config model."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

from clsjob import model_cache
from clsjob.config import (BackendSection, HFBackendConfig, Stage, StorageConfig,
                           VLLMPoolBackendConfig, VLLMPromptBackendConfig)
from clsjob.labels import LabelSet
from clsjob.task import SINGLE_LABEL, Task


class ModelError(ValueError):
    """A model folder that cannot serve this job; the message names the folder."""


class GPUMissing(RuntimeError):
    """An actor given GPUs that finds no CUDA device; the message names the node."""


def require_cuda(use_gpu: bool) -> None:
    """An actor Ray gave GPUs must find one. On a cluster, running on the CPU instead is a
    mis-scheduled job 100x slow, not a fallback: fail at start, naming the node."""
    if not use_gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    import socket

    import ray

    node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    raise GPUMissing(
        f"node {node}: this actor was given resources.gpus_per_actor GPU(s) but finds no CUDA "
        f"device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}; torch "
        f"{torch.__version__}, {build}). "
        f"The node's GPUs are missing, hidden or held by another process, or torch lacks CUDA; "
        f"it will not run on the CPU instead. Set resources.gpus_per_actor: 0 to run on CPUs.")


@dataclass(frozen=True)
class CheckedModel:
    """What the driver learns of the model before a run: the labels in output order, what
    its probabilities are scaled by (calibration.py; None: the back end gives none), and the
    folder's config.json (abstain.py reads its threshold there)."""
    labels: LabelSet
    temperature: float | None
    config: dict
    # A cascade: each stage's temperature (the run's `temperature` is then None).
    stage_temperatures: tuple = ()
    # (setting, fingerprint) of files besides the config that decide the rows written (a
    # prompt's pool of shots): part of the work hash.
    inputs: tuple = ()


@dataclass(frozen=True)
class BackEnd:
    """One back end. The check and the actor are named, not imported: a back end's heavy
    dependencies (torch, vLLM) load only when it is used."""
    config: type[BackendSection]
    check: str  # "module:function"(backend, configured labels, storage) -> CheckedModel
    actor: str  # "module:Class"(backend, labels, text_column, use_gpu, storage, **driver_kwargs)
    # "module:function"(backend, labels, storage) -> extra actor kwargs, read once on the driver
    driver_kwargs: str | None = None

    def actor_class(self) -> type:
        return resolve(self.actor)


REGISTRY: dict[str, BackEnd] = {
    # vllm_pool serves the same merged classifier folder as hf: hf's checks, and vLLM's
    # registry must hold the architecture.
    "hf": BackEnd(HFBackendConfig, "clsjob.backends.hf:check_model_folder",
                  "clsjob.backends.hf:HFClassifier"),
    "vllm_pool": BackEnd(VLLMPoolBackendConfig, "clsjob.backends.vllm_pool:check_pooled_model",
                         "clsjob.backends.vllm_pool:VLLMPoolClassifier"),
    "vllm_prompt": BackEnd(VLLMPromptBackendConfig, "clsjob.backends.vllm_prompt:check_prompted_model",
                           "clsjob.backends.vllm_prompt:VLLMPromptClassifier",
                           driver_kwargs="clsjob.backends.vllm_prompt:actor_examples"),
}


def resolve(name: str) -> Callable:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def actor_class(backend: BackendSection) -> type:
    return REGISTRY[backend.kind].actor_class()


def actor_kwargs(cfg, labels: LabelSet, backend: BackendSection | None = None,
                 resources=None) -> dict:
    """Constructor arguments of a back end's actor (cfg: a ClassifyConfig; `backend` and
    `resources`: a cascade stage's, else the config's own)."""
    backend, resources = backend or cfg.backend, resources or cfg.resources
    kwargs = {"backend": backend, "labels": labels, "text_column": cfg.input.text_column,
              "use_gpu": resources.gpus_per_actor > 0, "storage": cfg.storage}
    kwargs["task"] = Task.of(cfg.task)
    if cfg.abstain is not None and cfg.abstain.score == "distance":
        kwargs["distance"] = cfg.abstain.distance_kind()  # hf's alone: the config refuses the others
    extra = REGISTRY[backend.kind].driver_kwargs
    if extra:
        kwargs.update(resolve(extra)(backend, labels, cfg))
    return kwargs


def check_model(backend: BackendSection, configured: LabelSet | None, storage,
                task: Task = SINGLE_LABEL) -> CheckedModel:
    """Validate one back end's model and the labels for `task` on the driver, before any row
    is read, reading the model folder's config.json once."""
    checked = resolve(REGISTRY[backend.kind].check)(backend, configured, storage)
    if backend.serves_classifier:  # a fine-tuned head is single- or multi-label
        check_task(backend, checked, task)
    return checked


def check_stages(stages: list[Stage], configured: LabelSet | None, storage,
                 task: Task = SINGLE_LABEL) -> CheckedModel:
    """check_model of every stage of a run. Stages after the first label the rows the one
    before sent on, so all must give the same labels in the same order; the run then has a
    temperature per stage (`stage_temperatures`), none of its own."""
    checked = [check_model(stage.backend, configured, storage, task) for stage in stages]
    if len(checked) == 1:
        return checked[0]
    first = checked[0].labels.names
    for stage, model in zip(stages, checked):
        if model.labels.names == first:
            continue
        mine = model.labels.names
        fix = ("set `labels` to fix their order" if sorted(mine) == sorted(first) else
               f"they are spelled differently ({sorted(set(mine) - set(first))} against "
               f"{sorted(set(first) - set(mine))}): a fine-tuned model's labels are its "
               f"id2label, a prompted LLM's are `labels` — name them as the model does, and "
               f"put the wording the LLM should see in their descriptions")
        raise ModelError(f"{stage.key.rstrip('.')} ({stage.name}): labels {list(mine)} differ from "
                         f"the first stage's {list(first)}; every stage must give the same labels "
                         f"({fix})")
    return CheckedModel(checked[0].labels, None, {},
                        tuple(model.temperature for model in checked),
                        tuple(item for model in checked for item in model.inputs))


def check_task(backend: BackendSection, model: CheckedModel, task: Task) -> None:
    """A fine-tuned model folder serves the task it was trained for, with usable thresholds."""
    if not isinstance(task, Task):  # a task's name compares unequal to every Task
        raise TypeError(f"check_task takes the run's Task (Task.of(cfg.task)), not {task!r}")
    trained = Task.trained(model.config)
    if trained != task:
        raise ModelError(f"task: {task}, but backend.model {backend.model} was fine-tuned "
                         f"{trained} (config.json problem_type "
                         f"{model.config.get('problem_type')!r}); set task: {trained} or use a "
                         f"model fine-tuned with task: {task}")
    try:
        task.model_thresholds(model.config, model.labels, f"backend.model: {backend.model}")
    except ValueError as exc:
        raise ModelError(str(exc)) from None


def check_model_and_labels(backend: BackendSection, configured: LabelSet | None, storage,
                           task: Task = SINGLE_LABEL) -> LabelSet:
    """`check_model`'s label set in output order."""
    return check_model(backend, configured, storage, task).labels


def check_model_files(backend: BackendSection, storage: StorageConfig) -> dict:
    """The model folder (local or s3://) is complete, with safetensors weights; returns its
    config.json. Reads no weights: the driver may be on a node that never loads the model."""
    try:
        config, names = model_cache.model_config(backend.model, storage)
    except FileNotFoundError as exc:
        raise ModelError(str(exc)) from None
    top = set(names)
    missing = [f for f in ("config.json",) if f not in top]
    if not any(name.endswith(".safetensors") for name in top):
        missing.append("*.safetensors (only safetensors weights are loaded)")
    if not top & {"tokenizer.json", "tokenizer_config.json"}:
        missing.append("tokenizer.json")
    if missing:
        raise ModelError(f"backend.model: {backend.model} is incomplete, missing {missing}")
    return config


def local_backend(backend: BackendSection, storage: StorageConfig | None) -> BackendSection:
    """The back end's settings with `model` a folder on this node: an actor's first step.
    An s3:// model is fetched once per node into storage.model_cache (model_cache.py)."""
    if not model_cache.is_remote(backend.model):
        return backend
    local = model_cache.local_model(backend.model, storage or StorageConfig())
    return backend.model_copy(update={"model": local})
