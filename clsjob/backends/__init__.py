"""Classification back ends. Each is a Ray Data actor class: a heavy `__init__` that loads the
model once, and a thin `__call__(chunk) -> chunk` over pure functions in the same module."""
from __future__ import annotations

import json
from pathlib import Path

from clsjob.config import BackendConfig
from clsjob.labels import LabelSet


class ModelError(ValueError):
    """A model folder that cannot serve this job; the message names the folder."""


def actor_class(backend: BackendConfig) -> type:
    # Imported lazily: a back end's heavy dependencies load only when it is used.
    if backend.kind == "hf":
        from clsjob.backends.hf import HFClassifier
        return HFClassifier
    if backend.kind == "vllm_pool":
        from clsjob.backends.vllm_pool import VLLMPoolClassifier
        return VLLMPoolClassifier
    if backend.kind == "vllm_prompt":
        from clsjob.backends.vllm_prompt import VLLMPromptClassifier
        return VLLMPromptClassifier
    raise ValueError(f"backend.kind: unknown back end {backend.kind!r}")


def actor_kwargs(cfg, labels: LabelSet) -> dict:
    """Constructor arguments of the back end's actor (cfg: a ClassifyConfig)."""
    kwargs = {"backend": cfg.backend, "labels": labels, "text_column": cfg.input.text_column,
              "use_gpu": cfg.resources.gpus_per_actor > 0}
    if cfg.backend.kind == "vllm_prompt":
        from clsjob.backends.vllm_prompt import load_examples  # read once, on the driver
        kwargs["examples"] = load_examples(cfg.backend.prompt, labels, cfg.storage)
    return kwargs


def check_model_and_labels(backend: BackendConfig, configured: LabelSet | None, storage) -> LabelSet:
    """Validate the model and the labels on the driver, before any row is read; return the
    label set in output order."""
    if backend.kind in ("hf", "vllm_pool"):  # the same merged classifier folder
        from clsjob.backends.hf import check_model_folder
        return check_model_folder(backend, configured)
    if backend.kind == "vllm_prompt":
        from clsjob.backends.vllm_prompt import check_prompted_model
        return check_prompted_model(backend, configured, storage)
    raise ValueError(f"backend.kind: unknown back end {backend.kind!r}")


def check_model_files(backend: BackendConfig) -> dict:
    """The model folder is complete, with safetensors weights; returns its config.json."""
    folder = Path(backend.model)
    if not folder.is_dir():
        raise ModelError(f"backend.model: no model folder at {folder}")
    missing = [f for f in ("config.json",) if not (folder / f).exists()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors (only safetensors weights are loaded)")
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        missing.append("tokenizer.json")
    if missing:
        raise ModelError(f"backend.model: {folder} is incomplete, missing {missing}")
    return json.loads((folder / "config.json").read_text())
