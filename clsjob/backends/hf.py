"""`hf` back end: a merged *ForSequenceClassification folder (decoder LLM or encoder) run by
transformers. Decoder classifiers pool on the last non-pad token, so the pad token must be
known and padding must be on the right."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig

from clsjob import model_folder
from clsjob.backends import (CheckedModel, ModelError, check_model_files, local_backend,
                             require_cuda)
from clsjob.backends.rows import attach_probabilities, rows_to_classify, stamp
from clsjob.config import BackendSection, HFBackendConfig, StorageConfig
from clsjob.evaluation.distance import ClassGaussians, knn_distance, normalized
from clsjob.labels import LabelSet, resolve_model_labels
from clsjob.precision import resolve_dtype
from clsjob.representation import HeadInput
from clsjob.task import SINGLE_LABEL, Task


# Attention kernels for inference on a GPU: all of SDPA's but cuDNN's. torch 2.11 tries cuDNN's
# first on an H200, and it builds an execution plan for every (rows, tokens) shape it has not
# seen, which cost more than the forward itself (bench/RESULTS.md, GPU script); length-sorted
# micro-batches are nearly all new shapes.
GPU_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Rows per forward pass when `micro_batch_size` is left out, by device: a GPU is underused
# at 32 rows (BERT-base on an H200: 13% MFU against 22% at 128); a CPU is busy at 32, and
# more rows a batch only pad more (bench/padding.py).
DEVICE_MICRO_BATCH = {"cpu": 32, "cuda": 128}


def batching(backend: HFBackendConfig, device: str) -> tuple[int, int]:
    """(rows per forward pass, token-count multiple each batch is padded to) on `device`."""
    default = DEVICE_MICRO_BATCH["cuda" if device.startswith("cuda") else "cpu"]
    return backend.micro_batch_size or default, backend.pad_to_multiple_of


def check_model_folder(backend: BackendSection, configured: LabelSet | None,
                       storage: StorageConfig | None = None) -> CheckedModel:
    """Cheap checks on the driver (config.json only): the folder is complete, its labels
    match the config and its temperature is usable. Returns the output label order and the
    temperature the run applies (1 with `backend.calibrated: false`). Also vllm_pool's
    check: it serves the same folder."""
    config = check_model_files(backend, storage or StorageConfig())
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ModelError(f"backend.model: {backend.model} is {architectures}, not a merged "
                         f"*ForSequenceClassification model (run `clsjob merge` first?)")
    # PretrainedConfig reads id2label (or num_labels) as every model class does.
    model_labels = LabelSet.from_id2label(PretrainedConfig.from_dict(config).id2label)
    labels, _ = resolve_model_labels(configured, model_labels)
    try:
        temperature = model_folder.temperature(config, f"backend.model: {backend.model}")
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    return CheckedModel(labels, temperature if backend.calibrated else 1.0, config)


def load_classifier(backend: BackendSection, device: str, dtype: str = "float32"):
    """Model and tokenizer ready for batched inference on `device`, in `dtype`."""
    tokenizer = AutoTokenizer.from_pretrained(backend.model, trust_remote_code=backend.trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        backend.model, dtype=getattr(torch, dtype), use_safetensors=True,
        trust_remote_code=backend.trust_remote_code)
    vocab = model.get_input_embeddings().num_embeddings
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id >= vocab:
        # Decoder tokenizers often ship without one (or name one the model has no row for);
        # any existing token will do: the attention mask hides it and the model finds the last
        # real token by pad_token_id.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def load_ood_score(folder: str, config: PretrainedConfig,
                   kind: str = "knn") -> Callable[[np.ndarray], np.ndarray]:
    """abstain.score: distance's score of each row's representation (distance.py), from what
    a folder fine-tuned with training.distance_index_rows carries: knn, the cosine distance to
    the k-th nearest row of its index (rows x hidden, float16, unit length); mahalanobis, the
    distance to the nearest of its class means under their shared precision."""
    k, _ = model_folder.distance_settings(config.to_dict(), f"backend.model: {folder}", kind)
    path = Path(folder) / model_folder.DISTANCE_KINDS[kind][0]
    try:
        if kind == "knn":
            index = np.load(path, allow_pickle=False)
            if index.ndim != 2 or not len(index):
                raise ValueError(f"an array of shape {index.shape}")
            width, score = index.shape[1], lambda reps: knn_distance(reps, index, k)
        else:
            with np.load(path, allow_pickle=False) as saved:
                gaussians = ClassGaussians(saved["means"].astype(np.float64),
                                           saved["precision"].astype(np.float64))
            width, score = gaussians.means.shape[1], lambda reps: gaussians.distance(normalized(reps))
    except (KeyError, ValueError, OSError) as exc:
        raise ModelError(f"backend.model: {path} is not what clsjob finetune writes: {exc}") from None

    def ood_score(reps: np.ndarray) -> np.ndarray:
        if not len(reps):
            return np.zeros(0)
        if reps.shape[1] != width:
            raise ModelError(f"backend.model: {path.name} holds {width}-wide rows, the model "
                             f"in {folder} gives {reps.shape[1]}: it is from another model")
        return score(reps)
    return ood_score


def length_sorted_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so padding wastes little compute."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i:i + size] for i in range(0, len(order), size)]


def encode_truncating(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids cut to `max_length` (with the tokenizer's own truncation, so special tokens
    such as BERT's final [SEP] stay), and which rows were cut. Only the rows that do not fit
    are tokenised a second time."""
    ids = tokenizer(texts, verbose=False)["input_ids"]
    truncated = [len(row) > max_length for row in ids]
    long_rows = [i for i, cut in enumerate(truncated) if cut]
    if long_rows:
        cut = tokenizer([texts[i] for i in long_rows], truncation=True, max_length=max_length)
        for i, row in zip(long_rows, cut["input_ids"]):
            ids[i] = row
    return ids, truncated


def padded(tokenizer, rows: list[list[int]], multiple: int = 1) -> dict:
    """One micro-batch as tensors, right-padded to its longest row rounded up to `multiple`."""
    return tokenizer.pad({"input_ids": rows}, return_tensors="pt",
                         pad_to_multiple_of=multiple if multiple > 1 else None)


def predict_probs(model, tokenizer, texts: list[str], max_length: int, micro_batch: int,
                  device: str, encoded: list[list[int]] | None = None,
                  temperature: float = 1.0, task: Task = SINGLE_LABEL,
                  pad_to_multiple_of: int = 1) -> np.ndarray:
    """The task's probabilities (rows x model labels) for `texts`, in the order given."""
    if encoded is None:
        encoded, _ = encode_truncating(tokenizer, texts, max_length) if texts else ([], [])
    return predict(model, tokenizer, encoded, micro_batch, device, temperature, task,
                   pad_to_multiple_of)[0]


def predict(model, tokenizer, encoded: list[list[int]], micro_batch: int, device: str,
            temperature: float = 1.0, task: Task = SINGLE_LABEL, pad_to_multiple_of: int = 1,
            represent: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """The task's probabilities (rows x model labels) of rows already tokenised, in the order
    given, and with `represent` each row's representation from the same forward pass
    (representation.py; rows x hidden, float32), else None."""
    probs = np.zeros((len(encoded), model.config.num_labels), dtype=np.float32)
    if not encoded:
        return probs, (np.zeros((0, 0), dtype=np.float32) if represent else None)
    batches = length_sorted_batches([len(ids) for ids in encoded], micro_batch)
    order = [i for batch in batches for i in batch]
    head = HeadInput(model) if represent else contextlib.nullcontext()
    with torch.inference_mode(), head:
        if device.startswith("cuda"):
            batch_probs, reps = queued_probs(model, tokenizer, encoded, batches, device,
                                             temperature, task, pad_to_multiple_of, head)
            probs[order] = batch_probs
            return probs, placed(reps, order)
        reps = []
        for batch in batches:
            inputs = padded(tokenizer, [encoded[i] for i in batch], pad_to_multiple_of).to(device)
            logits = model(**inputs).logits.float()
            probs[batch] = task.probabilities(logits, temperature).cpu().numpy()
            if represent:
                reps.append(head.pooled(inputs["input_ids"]).cpu().numpy())
    return probs, placed(np.concatenate(reps) if represent else None, order)


def placed(rows: np.ndarray | None, order: list[int]) -> np.ndarray | None:
    """Rows computed in `order` put back in the input's order."""
    if rows is None:
        return None
    out = np.empty_like(rows)
    out[order] = rows
    return out


@torch.inference_mode()
def queued_probs(model, tokenizer, encoded: list[list[int]], batches: list[list[int]],
                 device: str, temperature: float = 1.0, task: Task = SINGLE_LABEL,
                 pad_to_multiple_of: int = 1,
                 head: HeadInput | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """On a GPU: the probabilities of `batches` (and with `head`, their representations),
    one after another, with GPU_ATTENTION's kernels, copied back once at the end. Copying each
    micro-batch's back would make the CPU wait for the GPU and the GPU then wait while the CPU
    pads the next batch; queued, the padding overlaps the GPU's work. (transformers still
    waits for the GPU once per forward, where it checks the attention mask for padding.)"""
    out, reps = [], []
    represent = isinstance(head, HeadInput)
    with sdpa_kernel(GPU_ATTENTION):
        for batch in batches:
            inputs = padded(tokenizer, [encoded[i] for i in batch], pad_to_multiple_of)
            # non_blocking: from pageable memory the data is staged before the call returns,
            # and the copy does not wait for the work queued on the GPU (a blocking one does).
            inputs = {key: value.to(device, non_blocking=True) for key, value in inputs.items()}
            out.append(task.probabilities(model(**inputs).logits.float(), temperature))
            if represent:
                reps.append(head.pooled(inputs["input_ids"]))
    return torch.cat(out).cpu().numpy(), (torch.cat(reps).cpu().numpy() if represent else None)


class HFClassifier:
    """Ray Data actor: loads the model once, labels one block of prepared chunks per call
    (output.parts_per_call), its rows sorted by length together.

    Ray Data may run several calls at once (resources.calls_per_actor): one chunk is
    tokenised while another's runs through the model, which takes one at a time (a second
    forward beside it would only split the same cores or GPU, and double the activations)."""

    def __init__(self, backend: HFBackendConfig, labels: LabelSet, text_column: str, use_gpu: bool,
                 storage: StorageConfig | None = None, task: Task = SINGLE_LABEL,
                 distance: str | None = None):
        require_cuda(use_gpu)
        self.backend = backend = local_backend(backend, storage)
        self.text_column = text_column
        self.device = "cuda" if use_gpu else "cpu"
        self.dtype = resolve_dtype(backend.dtype, self.device)
        self.model, self.tokenizer = load_classifier(backend, self.device, self.dtype)
        self.micro_batch, self.pad_to_multiple_of = batching(backend, self.device)
        self.temperature = (model_folder.temperature(self.model.config.to_dict(), backend.model)
                            if backend.calibrated else 1.0)
        model_labels = LabelSet.from_id2label(self.model.config.id2label)
        self.labels, self.columns = resolve_model_labels(labels, model_labels)
        self.task = task
        # A multi-label head's thresholds, in the config's label order (else None).
        self.thresholds = task.model_thresholds(self.model.config.to_dict(), self.labels, backend.model)
        # abstain.score: distance: the score of abstain.distance (knn or mahalanobis).
        self.ood_score = load_ood_score(backend.model, self.model.config, distance) if distance else None
        # A fast tokenizer is not safe to use from two threads at once ("Already borrowed").
        self.encode_lock, self.model_lock = threading.Lock(), threading.Lock()

    def __call__(self, table: pa.Table) -> pa.Table:
        todo = rows_to_classify(table)
        texts = table.column(self.text_column).to_pylist()
        todo_texts = [texts[i] for i in todo]
        with self.encode_lock:
            encoded, truncated = encode_truncating(self.tokenizer, todo_texts, self.backend.max_length)
        with self.model_lock:
            started = time.monotonic()
            probs, reps = predict(self.model, self.tokenizer, encoded, self.micro_batch, self.device,
                                  self.temperature, self.task, self.pad_to_multiple_of,
                                  represent=self.ood_score is not None)
            ood_score = self.ood_score(reps) if self.ood_score is not None else None
            busy_s = time.monotonic() - started
        # Reorder the model's label columns into the config's label order.
        out = attach_probabilities(table, todo, probs[:, self.columns], self.labels, truncated,
                                   self.task, self.thresholds, ood_score)
        return stamp(out, self.dtype, busy_s)
