"""`vllm_pool` back end: the merged *ForSequenceClassification folder (what `hf` runs) served by
vLLM's pooling runner, `LLM(model, runner="pooling").classify(...)`. vLLM packs rows of any
length into its batches itself, so there is no padding and no micro-batching to tune."""
from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pyarrow as pa

from clsjob import model_folder
from clsjob.backends import CheckedModel, ModelError, local_backend
from clsjob.backends.hf import check_model_folder, encode_truncating
from clsjob.backends.rows import attach_probabilities, rows_to_classify, stamp
from clsjob.backends import vllm_engine
from clsjob.backends.vllm_engine import (engine_args, engine_died, engine_dtype, exit_with_engine,
                                         prepare_env)
from clsjob.config import StorageConfig, VLLMPoolBackendConfig
from clsjob.labels import LabelSet, resolve_model_labels
from clsjob.task import SINGLE_LABEL, Task

HEAD = "ForSequenceClassification"


def check_pooled_model(backend: VLLMPoolBackendConfig, configured: LabelSet | None,
                       storage: StorageConfig | None = None) -> CheckedModel:
    """hf's checks of the folder, and that this vLLM can serve its architecture: found here,
    from config.json and vLLM's registry, rather than when every actor's engine fails to load
    the weights (Gemma 3) or refuses the architecture (MPNet, DeBERTa-v2) after Ray Data
    has started it."""
    checked = check_model_folder(backend, configured, storage)
    vllm_engine.check_max_model_len(backend, checked.config)
    import transformers
    import vllm
    from vllm.config.model import iter_architecture_defaults
    from vllm.model_executor.models import ModelRegistry

    architecture = checked.config["architectures"][0]
    if checked.config.get("auto_map"):
        return checked  # the model's own code (trust_remote_code): vLLM judges it at load
    why = pooling_refusal(architecture, set(ModelRegistry.get_supported_archs()),
                          [suffix for suffix, _ in iter_architecture_defaults()],
                          getattr(transformers, architecture, None))
    if why:
        raise ModelError(f"backend.model: {backend.model} is a {architecture}, which vLLM "
                         f"{vllm.__version__}'s pooling runner cannot serve: {why}. Use "
                         f"backend.kind: hf (the same folder, through transformers)")
    return checked


def pooling_refusal(architecture: str, supported: set[str], suffixes: list[str],
                    transformers_class) -> str | None:
    """Why vLLM cannot load a merged `architecture` folder, or None. vLLM serves a
    *ForSequenceClassification it implements; else it converts the first of the family's
    classes, in the order of its own suffix list, that it has (a causal LM: Qwen2, Llama, ...);
    else it falls back to the transformers class, if that one can use vLLM's attention."""
    if architecture in supported:
        return None
    for suffix in suffixes:
        base = architecture.replace(HEAD, suffix)
        if base == architecture or base not in supported:
            continue
        if suffix == "Model":
            return (f"it has no {architecture.replace(HEAD, 'ForCausalLM')} to convert, only the "
                    f"bare body {base}, whose weights lack the merged folder's 'model.' prefix")
        return None
    compatible = transformers_class is not None and (
        transformers_class.is_backend_compatible()
        or getattr(transformers_class, "_can_set_attn_implementation", lambda: False)())
    if compatible:
        return None  # vLLM's transformers fallback; it may still refuse at load (DistilBERT)
    return f"it implements neither {architecture} nor a causal LM of its family to convert"


class VLLMPoolClassifier:
    """Ray Data actor: one pooling engine; labels one prepared chunk per call.

    With several calls at once (resources.calls_per_actor), one chunk is tokenised while
    another's rows are in the engine, which takes one `classify` at a time. A pooling request
    is done in one forward step, so a chunk's tail leaves the engine idle for one partly
    filled batch at most; vllm_prompt, whose answers take many steps, shares the engine
    across chunks instead (vllm_engine.EngineFeed)."""

    def __init__(self, backend: VLLMPoolBackendConfig, labels: LabelSet, text_column: str, use_gpu: bool,
                 storage: StorageConfig | None = None, task: Task = SINGLE_LABEL):
        prepare_env(use_gpu)
        self.backend = backend = local_backend(backend, storage)
        self.text_column = text_column
        self.llm = vllm_engine.start_watched_engine(engine_args(backend, use_gpu, "pooling"))
        # The rows are tokenised on the calls' threads while the engine may detokenise on
        # another: they get their own copy of the tokenizer (a fast one is not thread-safe).
        self.tokenizer, self.dtype = copy.deepcopy(self.llm.get_tokenizer()), engine_dtype(self.llm)
        self.encode_lock, self.engine_lock = threading.Lock(), threading.Lock()
        hf_config = self.llm.llm_engine.model_config.hf_config
        # vLLM returns softmax(logits); the temperature is applied to those (task.scaled).
        self.temperature = (model_folder.temperature(hf_config.to_dict(), backend.model)
                            if backend.calibrated else 1.0)
        model_labels = LabelSet.from_id2label(hf_config.id2label)
        self.labels, self.columns = resolve_model_labels(labels, model_labels)
        # A multi-label head: vLLM gives a sigmoid per label (the config's problem_type says
        # so), decided by the labels' thresholds.
        self.task = task
        self.thresholds = task.model_thresholds(hf_config.to_dict(), self.labels, backend.model)

    def __call__(self, table: pa.Table) -> pa.Table:
        from vllm.inputs import TokensPrompt

        todo = rows_to_classify(table)
        texts = table.column(self.text_column).to_pylist()
        # The same tokens as the hf back end: the tokenizer's own truncation, flagged.
        with self.encode_lock:
            encoded, truncated = encode_truncating(self.tokenizer, [texts[i] for i in todo],
                                                   self.backend.max_length)
        with self.engine_lock:
            started = time.monotonic()
            try:
                outputs = self.llm.classify([TokensPrompt(prompt_token_ids=ids) for ids in encoded],
                                            use_tqdm=False) if encoded else []
            except Exception as exc:
                if engine_died(exc):
                    exit_with_engine(exc)
                raise
            busy_s = time.monotonic() - started
        probs = np.array([o.outputs.probs for o in outputs], dtype=np.float32).reshape(
            len(encoded), -1)
        probs = self.task.scaled(probs, self.temperature)
        out = attach_probabilities(table, todo, probs[:, self.columns], self.labels, truncated,
                                   self.task, self.thresholds)
        return stamp(out, self.dtype, busy_s)
