"""`vllm_pool` back end: the merged *ForSequenceClassification folder (what `hf` runs) served by
vLLM's pooling runner, `LLM(model, runner="pooling").classify(...)`. vLLM packs rows of any
length into its batches itself, so there is no padding and no micro-batching to tune."""
from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pyarrow as pa

from clsjob.backends import local_backend
from clsjob.backends.hf import encode_truncating
from clsjob.backends.rows import attach_label_sets, attach_probabilities, rows_to_classify, stamp
from clsjob.backends import vllm_engine
from clsjob.calibration import model_temperature, rescale_probs
from clsjob.backends.vllm_engine import (engine_args, engine_died, engine_dtype, exit_with_engine,
                                         prepare_env)
from clsjob.config import StorageConfig, VLLMPoolBackendConfig
from clsjob.labels import LabelSet, resolve_model_labels
from clsjob.multilabel import model_thresholds


class VLLMPoolClassifier:
    """Ray Data actor: one pooling engine; labels one prepared chunk per call.

    With several calls at once (resources.calls_per_actor), one chunk is tokenised while
    another's rows are in the engine, which takes one `classify` at a time. A pooling request
    is done in one forward step, so a chunk's tail leaves the engine idle for one partly
    filled batch at most; vllm_prompt, whose answers take many steps, shares the engine
    across chunks instead (vllm_engine.EngineFeed)."""

    def __init__(self, backend: VLLMPoolBackendConfig, labels: LabelSet, text_column: str, use_gpu: bool,
                 storage: StorageConfig | None = None, multi_label: bool = False):
        prepare_env(use_gpu)
        self.backend = backend = local_backend(backend, storage)
        self.text_column = text_column
        self.llm = vllm_engine.start_watched_engine(engine_args(backend, use_gpu, "pooling"))
        # The rows are tokenised on the calls' threads while the engine may detokenise on
        # another: they get their own copy of the tokenizer (a fast one is not thread-safe).
        self.tokenizer, self.dtype = copy.deepcopy(self.llm.get_tokenizer()), engine_dtype(self.llm)
        self.encode_lock, self.engine_lock = threading.Lock(), threading.Lock()
        hf_config = self.llm.llm_engine.model_config.hf_config
        # vLLM returns softmax(logits); the temperature is applied to those (rescale_probs).
        self.temperature = (model_temperature(hf_config.to_dict(), backend.model)
                            if backend.calibrated else 1.0)
        model_labels = LabelSet.from_id2label(hf_config.id2label)
        self.labels, self.columns = resolve_model_labels(labels, model_labels)
        # multi_label: vLLM gives a sigmoid per label (the config's problem_type says so).
        self.thresholds = (model_thresholds(hf_config.to_dict(), self.labels, backend.model)
                           if multi_label else None)

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
        if self.thresholds is not None:
            out = attach_label_sets(table, todo, probs[:, self.columns], self.labels,
                                    self.thresholds, truncated)
        else:
            probs = rescale_probs(probs, self.temperature)
            out = attach_probabilities(table, todo, probs[:, self.columns], self.labels, truncated)
        return stamp(out, self.dtype, busy_s)
