"""GPU benchmark: the `hf` back end's rows/s, tokens/s and model FLOP utilisation on a
BERT-base-shaped encoder and a Qwen2.5-0.5B-shaped decoder, against a naive `transformers`
pipeline loop on the same rows; then QLoRA steps and the merge on the Qwen2.5-0.5B shape.
Random weights throughout (no model can be downloaded on the GPU machine; speed and memory do
not depend on the values). Imports nothing of Ray or vLLM: it runs on a bare GPU machine.

    bench/gpu.sh                                                      # on the GPU machine
    .venv/bin/python bench/gpu.py --smoke --out /tmp/gpu-smoke.json   # CPU, tiny shapes, < 3 min
    .venv/bin/python bench/gpu.py --pack models/minilm models/minilm-gpu   # CPU: a real model to carry
    bench/gpu.sh --real-model models/minilm-gpu    # on the GPU machine, models/minilm-gpu carried

Parts, each with a time budget; a part the remaining time cannot fit is skipped with a note,
so the whole run, imports included, ends within --budget-s (330 s on a GPU):

  matmul     torch.matmul of two 8192 x 8192 bf16 matrices, timed by CUDA events: the rate
             the model FLOP utilisation (MFU) is measured against
  bert-base, qwen2.5-0.5b   (inference, one part per model)
             10,000 rows whose token counts are log-normal (median 200, sigma 0.6, at least
             8, capped at 512: mean about 230), in bf16:
             - hf: the back end's actor (HFClassifier, called directly on 1,024-row Arrow
               chunks as Ray Data calls it: tokenising, length-sorting, micro-batching,
               softmax, output columns), at micro_batch_size 32 (the default before
               issue 31; 128 is the GPU default now) and larger; then at 128 on calls of 8
               chunks (output.parts_per_call's GPU default: rows sorted over 8,192), alone,
               with length buckets of 16 tokens (backend.pad_to_multiple_of), and with
               buckets and cuDNN attention allowed again (its plans reused across few shapes)
             - model only: predict_probs on the same rows already tokenised
             - dense: one micro-batch of 256-token rows without padding, forward only,
               timed by CUDA events (what the model itself reaches at that shape)
             - shape cost: a forward on a batch shape not run before, and the same again,
               with SDPA's default kernels and with the hf path's (no cuDNN attention)
             - naive: transformers.pipeline("text-classification", device=0, dtype=bf16)
               called on the rows in their order, as a user first writes it (batch_size
               default 1, and 32), timed on as many rows as its time slice allows
  qlora      build_trainable (NF4, LoRA r 64 / alpha 64 on every linear layer of the body,
             gradient checkpointing) under the HF Trainer with the project's
             training_arguments (bf16) on random 32 x 512-token batches: step time, tokens/s,
             peak GPU memory; then the adapter saved and `merge`d: wall time, merged size

Forward FLOPs, counted for useful tokens only (padding is not counted), for a row of s tokens:
    2 * P_tok * s  +  2 * P_row  +  4 * L * h * s^2
P_tok: weights of the body's linear layers, which run on every token (embeddings are lookups,
norms and biases elementwise: not counted); P_row: linear layers that run once per row
(BERT's pooler and every head); L layers; h = attention heads x head size. The last term is
QK^T and the weighted sum over the full s x s square, as PaLM's MFU counts it, though a causal
kernel may skip half of it. MFU = achieved FLOP/s / the matmul rate measured in the same run.

With --smoke every part runs the same code on CPU with tiny shapes, in fp32, and the run
fails if anything imported Ray.

Real models: the GPU machine reaches no model hub and takes at most 64 MiB of files a call, so
a real model travels only as a folder `--pack` writes here: the encoder's own weights and
tokenizer in float16 with a 4-label head (random: speed does not depend on the head's values).
all-MiniLM-L6-v2 packs to ~44 MiB and travels; all-mpnet-base-v2 packs to ~210 MiB and does
not (--pack says so and exits 1). Each --real-model FOLDER is one more inference part, run
after the others with the same measurements, on texts of single-token words of its own
vocabulary (WordPiece or byte-level BPE).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable

STARTED = time.monotonic()  # the overall budget counts the heavy imports below too
from common import REPO, cpu_name, git_commit, package_version  # noqa: E402  (puts clsjob on the path)

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from torch.nn.attention import sdpa_kernel  # noqa: E402
from transformers import (AutoModelForSequenceClassification, AutoTokenizer,  # noqa: E402
                          BertConfig, BertForSequenceClassification,
                          DataCollatorWithPadding, Qwen2Config, Qwen2ForSequenceClassification,
                          Trainer, TrainerCallback, pipeline)

from clsjob.backends.hf import (GPU_ATTENTION, HFClassifier, encode_truncating,  # noqa: E402
                                length_sorted_batches, predict_probs)
from clsjob.config import FinetuneConfig, HFBackendConfig, MergeConfig, OutputConfig, validate  # noqa: E402
from clsjob.config.classify import GPU_PARTS_PER_CALL  # noqa: E402

BUCKET = 16  # the length buckets measured (backend.pad_to_multiple_of)
from clsjob.finetune.merge import merge  # noqa: E402
from clsjob.finetune.model import build_trainable, load_tokenizer  # noqa: E402
from clsjob.finetune.summary import SUMMARY, peak_memory_gib  # noqa: E402
from clsjob.precision import resolve_dtype  # noqa: E402
from clsjob.finetune.trainer import training_arguments  # noqa: E402
from clsjob.labels import LabelSet  # noqa: E402
from tiny_models import build_tokenizer  # noqa: E402

LABELS = LabelSet(("world", "sports", "business", "science"))
# Checkpoints of both ship in bf16 or fp32; stored in bf16 here, and the hf back end and
# build_trainable cast on load as they would a real one.
STORED_DTYPE = torch.bfloat16
QWEN25 = dict(vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
              hidden_act="silu", use_sliding_window=False)
BERT = dict(vocab_size=30522, type_vocab_size=2, hidden_act="gelu", max_position_embeddings=512)
FULL_SHAPES = {
    "bert-base": ("bert", dict(BERT, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072)),
    "qwen2.5-0.5b": ("qwen2", dict(QWEN25, hidden_size=896, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2,
                                   intermediate_size=4864, max_position_embeddings=32768)),
}
SMOKE_SHAPES = {
    "tiny-bert": ("bert", dict(BERT, vocab_size=1024, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=128)),
    "tiny-qwen": ("qwen2", dict(QWEN25, vocab_size=1024, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128, max_position_embeddings=1024)),
}
MERGE_SHARE = 0.4  # of the QLoRA part's budget, kept for saving the adapter and merging
MATMUL_CALLS = 50  # per timed round: ~70 ms at 8192 on an H200, so event overhead vanishes
DENSE_TOKENS = 256  # row length of the dense forward: near the rows' mean
NAIVE_SLICE = 64    # rows per pipeline call in the naive loop: the clock is read between calls
SHAPE_ROWS = 24     # rows of shape_cost's batches: a count no other measurement uses
SHAPE_TRIES = 5     # new shapes per kernel order
TRANSFER_LIMIT_MIB = 64  # what one call to the GPU machine carries (a packed model and the code)


@dataclass(frozen=True)
class Profile:
    """How big each part is: the real shapes on a GPU, tiny ones for --smoke on CPU."""
    shapes: dict[str, tuple[str, dict]]  # name: (family, config)
    finetune_model: str
    rows: int
    median_tokens: int
    max_tokens: int
    micro_batches: tuple[int, ...]  # the first is the back end's default
    repeats: int
    naive_batches: tuple[int, ...]
    naive_s: float  # per naive variant
    batch_size: int
    seq_len: int
    warmup_steps: int
    timed_steps: int
    matmul_size: int
    total_s: float
    budget_s: dict[str, float]  # per part: "matmul", each shape's name, "qlora"
    real_model_s: float  # per --real-model folder, added to total_s


FULL = Profile(shapes=FULL_SHAPES, finetune_model="qwen2.5-0.5b", rows=10_000, median_tokens=200,
               max_tokens=512, micro_batches=(32, 128, 256), repeats=2, naive_batches=(1, 32),
               naive_s=10, batch_size=32, seq_len=512, warmup_steps=3, timed_steps=10,
               matmul_size=8192,
               total_s=330,  # bench/gpu.sh kills at 420 s (330 + a real model)
               budget_s={"matmul": 15, "bert-base": 75, "qwen2.5-0.5b": 100, "qlora": 90},
               real_model_s=40)
SMOKE = Profile(shapes=SMOKE_SHAPES, finetune_model="tiny-qwen", rows=200, median_tokens=40,
                max_tokens=128, micro_batches=(32, 64), repeats=2, naive_batches=(1, 32),
                naive_s=3, batch_size=4, seq_len=64, warmup_steps=1, timed_steps=3,
                matmul_size=256, total_s=175,
                budget_s={"matmul": 10, "tiny-bert": 45, "tiny-qwen": 50, "qlora": 50},
                real_model_s=90)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: proves the code paths")
    p.add_argument("--budget-s", type=float, default=None,
                   help="overall time limit, imports included (default: 330 on GPU, 175 smoke)")
    p.add_argument("--workdir", default=None, help="model folders (default: a temp dir, removed)")
    p.add_argument("--source", default=None,
                   help="what code ran, for the report (default: this checkout's git commit)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu.json"))
    p.add_argument("--real-model", action="append", default=[], metavar="FOLDER",
                   help="a folder --pack wrote: measured after the random shapes (repeatable)")
    p.add_argument("--pack", nargs=2, metavar=("ENCODER", "DEST"),
                   help="write ENCODER (a model folder) to DEST as a float16 classifier for "
                        "--real-model, say whether it fits the GPU machine's transfer, and exit")
    return p.parse_args()


# --- time ---------------------------------------------------------------------------------------

class Clock:
    """The overall deadline, and each part's: its own budget, never past the overall one."""

    def __init__(self, total_s: float):
        self.end = STARTED + total_s

    def left(self) -> float:
        return self.end - time.monotonic()

    def deadline(self, budget_s: float) -> float:
        return min(time.monotonic() + budget_s, self.end)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_seconds(run: Callable[[], object], device: str) -> float:
    """Seconds `run` takes; on a GPU by CUDA events, since the work is queued asynchronously
    and a wall clock would time only the launches."""
    if not device.startswith("cuda"):
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    run()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000


def wall_seconds(run: Callable[[], object]) -> float:
    """Wall time of work that ends by copying its results to the host (so the GPU's share is
    inside the clock)."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def free_device_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        # Each part's peak is its own, not the largest of every part so far.
        torch.cuda.reset_peak_memory_stats()


# --- models and rows ----------------------------------------------------------------------------

def build_random_classifier(folder: Path, family: str, shape: dict, device: str) -> Path:
    """A merged-classifier folder (weights, tokenizer, id2label) with random weights."""
    if (folder / "config.json").exists():
        return folder
    tokenizer = build_tokenizer(folder)  # a few hundred tokens: ids above it are still valid model inputs
    ids = dict(pad_token_id=tokenizer.pad_token_id, id2label=LABELS.id2label(),
               label2id=LABELS.label2id())
    if family == "bert":
        config, model_class = BertConfig(**shape, **ids), BertForSequenceClassification
    else:
        config = Qwen2Config(**shape, **ids, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.bos_token_id)
        model_class = Qwen2ForSequenceClassification
    torch.manual_seed(0)
    with torch.device(device):  # random init of 0.5B parameters takes seconds on a GPU, not a minute
        model = model_class(config)
    model.to(STORED_DTYPE).save_pretrained(folder)
    del model
    free_device_memory(device)
    return folder


def single_token_words(tokenizer) -> list[str]:
    """Words (with their leading space) that the tokenizer keeps as one token each: a text of
    n of them is exactly n tokens. "Ġ" is byte-level BPE's mark for a leading space; WordPiece
    (BERT, MPNet) has no such mark and splits on spaces, so its whole-word entries qualify."""
    vocab = tokenizer.get_vocab()
    if any(t.startswith("Ġ") for t in vocab):
        candidates = sorted(" " + t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha())
    else:
        candidates = sorted(" " + t for t in vocab if t.isalpha())
    return [w for w in candidates if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def pack_real_model(encoder: Path, dest: Path) -> int:
    """ENCODER as a float16 classifier folder at DEST (its weights and tokenizer, a random
    4-label head), for --real-model; 0 if it fits one call's transfer, else 1."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder, num_labels=len(LABELS), id2label=LABELS.id2label(), label2id=LABELS.label2id())
    model.to(torch.float16).save_pretrained(dest)
    AutoTokenizer.from_pretrained(encoder).save_pretrained(dest)
    size = folder_mib(dest)
    fits = size < TRANSFER_LIMIT_MIB - 4  # the code travels in the same call
    print(f"{dest}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{size:.1f} MiB in float16: {'fits' if fits else 'does not fit'} the GPU machine's "
          f"{TRANSFER_LIMIT_MIB} MiB a call")
    return 0 if fits else 1


def realistic_texts(tokenizer, rows: int, median: int, cap: int, seed: int = 0) -> list[str]:
    """Random-word texts whose token counts are log-normal around `median` (sigma 0.6, so
    the mean is about 1.2 x the median), at least 8 and capped at `cap`: the lengths of
    reviews, news items and support tickets rather than one fixed length."""
    rng = random.Random(seed)
    words = single_token_words(tokenizer)
    lengths = [max(8, min(cap, round(rng.lognormvariate(math.log(median), 0.6)))) for _ in range(rows)]
    return ["".join(rng.choices(words, k=n)) for n in lengths]


def arrow_chunks(texts: list[str], size: int) -> list[pa.Table]:
    """The chunks Ray Data hands the actor: `output.rows_per_part` rows with the prepare
    stage's `error` column (all null: every row is to be labelled)."""
    table = pa.table({"text": texts, "error": pa.array([None] * len(texts), pa.string())})
    return [table.slice(start, size) for start in range(0, len(texts), size)]


def random_training_rows(tokenizer, vocab_size: int, rows: int, seq_len: int) -> list[dict]:
    """Rows shaped like the project's `encode` output, every one exactly seq_len tokens."""
    generator = torch.Generator().manual_seed(0)
    # Above every special id: the head pools on the last token that is not the pad token.
    ids = torch.randint(max(tokenizer.all_special_ids) + 1, vocab_size, (rows, seq_len),
                        generator=generator)
    golds = torch.randint(0, len(LABELS), (rows,), generator=generator)
    return [{"input_ids": row.tolist(), "attention_mask": [1] * seq_len, "labels": int(gold)}
            for row, gold in zip(ids, golds)]


# --- part: matmul rate --------------------------------------------------------------------------

def model_dtype(device: str) -> torch.dtype:
    """What the hf back end runs in on `device` by default (backend.dtype: auto)."""
    return getattr(torch, resolve_dtype("auto", device))


def matmul_rate(size: int, device: str, deadline: float) -> dict:
    """FLOP/s of square matmuls in the dtype the hf back end computes in (bf16 on a GPU), on
    random data (zeros run faster than real data)."""
    dtype = model_dtype(device)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)

    def calls() -> None:
        for _ in range(MATMUL_CALLS):
            torch.matmul(a, b, out=out)

    for _ in range(2):  # warm-up: cuBLAS handle, kernel choice, GPU clocks up
        calls()
    synchronize(device)
    rounds = []
    while len(rounds) < 10 and (not rounds or time.monotonic() < deadline):
        rounds.append(timed_seconds(calls, device) / MATMUL_CALLS)
    flops = 2 * size ** 3
    # The best round is the attainable rate; the median shows how steady it was.
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "rounds": len(rounds),
            "tflops": flops / min(rounds) / 1e12,
            "tflops_median": flops / statistics.median(rounds) / 1e12}


# --- part: inference ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FlopModel:
    """The counts of the module doc string's formula, read off a loaded model."""
    per_token: int  # P_tok
    per_row: int    # P_row
    layers: int     # L
    attention: int  # h

    @classmethod
    def of(cls, model) -> "FlopModel":
        body_name = model.base_model_prefix
        per_token = per_row = 0
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                in_body = name.startswith(body_name + ".") and ".pooler." not in f".{name}."
                if in_body:
                    per_token += module.weight.numel()
                else:
                    per_row += module.weight.numel()
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(per_token, per_row, c.num_hidden_layers, c.num_attention_heads * head_dim)

    def row(self, s: int) -> float:
        return 2 * self.per_token * s + 2 * self.per_row + 4 * self.layers * self.attention * s * s

    def rows(self, lengths: list[int]) -> float:
        return float(sum(self.row(s) for s in lengths))


def padded_tokens(lengths: list[int], chunk: int, micro_batch: int, multiple: int = 1) -> int:
    """Tokens the model computes, padding included, when the actor gets `chunk`-row chunks and
    length-sorts each into micro-batches (as HFClassifier does), each padded to a multiple."""
    total = 0
    for start in range(0, len(lengths), chunk):
        part = lengths[start:start + chunk]
        total += sum(len(b) * -(-max(part[i] for i in b) // multiple) * multiple
                     for b in length_sorted_batches(part, micro_batch))
    return total


def rate(rows: int, tokens: int, flops: float, seconds: float, matmul_tflops: float | None) -> dict:
    achieved = flops / seconds / 1e12
    return {"seconds": round(seconds, 4), "rows_per_s": rows / seconds,
            "tokens_per_s": tokens / seconds, "achieved_tflops": achieved,
            "mfu": achieved / matmul_tflops if matmul_tflops else None}


def repeated(run: Callable[[], object], repeats: int, deadline: float) -> list[float]:
    """Wall seconds of up to `repeats` runs; at least one, more only before the deadline."""
    seconds: list[float] = []
    while len(seconds) < repeats and (not seconds or time.monotonic() < deadline):
        seconds.append(wall_seconds(run))
    return seconds


def hf_actor(classifier: HFClassifier, backend: HFBackendConfig, chunks: list[pa.Table],
             micro_batch: int, repeats: int, deadline: float, multiple: int = 1,
             cudnn: bool = False) -> list[float]:
    """The actor over every chunk with `micro_batch_size` and `pad_to_multiple_of` set as a
    user's config sets them; `cudnn`: with cuDNN attention first among the kernels, as SDPA
    would pick it, instead of the hf path's GPU_ATTENTION."""
    from torch.nn.attention import SDPBackend

    from clsjob.backends import hf

    classifier.backend = backend.model_copy(update={"micro_batch_size": micro_batch,
                                                    "pad_to_multiple_of": multiple})
    # The actor reads its batching once, at start (hf.batching).
    classifier.micro_batch, classifier.pad_to_multiple_of = micro_batch, multiple
    labelled: list[pa.Table] = []
    kernels = hf.GPU_ATTENTION

    def run() -> None:
        labelled[:] = [classifier(chunk) for chunk in chunks]  # probabilities end on the host

    # queued_probs reads the module's list at each call: a candidate, not a change.
    hf.GPU_ATTENTION = [SDPBackend.CUDNN_ATTENTION, *kernels] if cudnn else kernels
    try:
        seconds = repeated(run, repeats, deadline)
    finally:
        hf.GPU_ATTENTION = kernels
    if sum(table.column("label").null_count for table in labelled):
        raise RuntimeError("the hf back end left rows without a label")
    return seconds


def dense_forward(model, micro_batch: int, device: str, vocab: int, matmul_tflops: float | None,
                  flops: FlopModel) -> dict:
    """Forward passes of one unpadded micro-batch of DENSE_TOKENS-token rows, CUDA-event timed:
    the model's own speed at that shape, without tokenising, padding or copies."""
    ids = torch.randint(8, vocab, (micro_batch, DENSE_TOKENS), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode(), sdpa_kernel(GPU_ATTENTION):  # the kernels the hf path uses
        model(**inputs)  # warm-up
        calls = 5
        seconds = timed_seconds(lambda: [model(**inputs) for _ in range(calls)], device) / calls
    return {"micro_batch_size": micro_batch, "tokens_per_row": DENSE_TOKENS,
            **rate(micro_batch, micro_batch * DENSE_TOKENS, flops.rows([DENSE_TOKENS] * micro_batch),
                   seconds, matmul_tflops)}


def shape_cost(model, device: str, vocab: int) -> dict:
    """Wall milliseconds of forwards on padded (SHAPE_ROWS, tokens) batches of a shape this
    process has not run before, and of the same batch run again at once: with SDPA's default
    kernel order, then with the hf path's GPU_ATTENTION (on other new shapes). What a new
    shape costs, measured rather than guessed."""
    result = {}
    for name, kernels, start in (("default", None, 301), ("gpu_attention", GPU_ATTENTION, 331)):
        new_s, again_s = [], []
        for tokens in range(start, start + 2 * SHAPE_TRIES, 2):
            ids = torch.randint(8, vocab, (SHAPE_ROWS, tokens), device=device)
            mask = torch.ones_like(ids)
            mask[0, tokens // 2:] = 0  # one short row: a masked forward, as length-sorted batches are
            inputs = {"input_ids": ids, "attention_mask": mask}

            def forward() -> None:
                model(**inputs).logits.float().cpu()  # back on the host: the GPU's work is done

            with torch.inference_mode(), (sdpa_kernel(kernels) if kernels else nullcontext()):
                new_s.append(wall_seconds(forward))
                again_s.append(wall_seconds(forward))
        result[name] = {"new_shape_ms": 1e3 * statistics.median(new_s),
                        "same_shape_ms": 1e3 * statistics.median(again_s), "shapes": SHAPE_TRIES}
    return {"rows": SHAPE_ROWS, **result}


def naive_pipeline(folder: Path, texts: list[str], lengths: list[int], batch_size: int,
                   device: str, seconds_for: float, flops: FlopModel,
                   matmul_tflops: float | None) -> dict:
    """transformers' text-classification pipeline over the rows in their order, as a user
    first writes it: no sorting, the pipeline's own tokenising and padding; timed on as many
    rows as `seconds_for` allows (whole slices of NAIVE_SLICE rows)."""
    # The pipeline turns the tokenizers' threads off for the whole process (it sets
    # TOKENIZERS_PARALLELISM=false where unset); put that back for the parts after it.
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        return naive_loop(folder, texts, lengths, batch_size, device, seconds_for, flops,
                          matmul_tflops)
    finally:
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism


def naive_loop(folder: Path, texts: list[str], lengths: list[int], batch_size: int, device: str,
               seconds_for: float, flops: FlopModel, matmul_tflops: float | None) -> dict:
    classify = pipeline("text-classification", model=str(folder),
                        device=0 if device.startswith("cuda") else -1, dtype=model_dtype(device))
    classify(texts[:batch_size], batch_size=batch_size, truncation=True)  # warm-up
    done, start = 0, time.perf_counter()
    while done < len(texts) and (done == 0 or time.perf_counter() - start < seconds_for):
        answers = classify(texts[done:done + NAIVE_SLICE], batch_size=batch_size, truncation=True)
        if len(answers) != len(texts[done:done + NAIVE_SLICE]):
            raise RuntimeError("the pipeline returned fewer answers than rows")
        done += len(answers)
    seconds = time.perf_counter() - start
    del classify
    return {"batch_size": batch_size, "rows": done, "tokens": sum(lengths[:done]),
            **rate(done, sum(lengths[:done]), flops.rows(lengths[:done]), seconds, matmul_tflops)}


def inference(name: str, folder: Path, profile: Profile, device: str, deadline: float,
              matmul_tflops: float | None) -> dict:
    """Every inference measurement of one model (see the module doc string)."""
    cuda = device.startswith("cuda")
    backend = HFBackendConfig(model=str(folder))  # defaults a user gets: max_length 512, micro-batch 32
    load_start = time.perf_counter()
    classifier = HFClassifier(backend, LABELS, "text", use_gpu=cuda)
    load_s = time.perf_counter() - load_start
    model, tokenizer = classifier.model, classifier.tokenizer
    flops = FlopModel.of(model)
    texts = realistic_texts(tokenizer, profile.rows, profile.median_tokens, profile.max_tokens)
    tokenize_start = time.perf_counter()
    encoded, truncated = encode_truncating(tokenizer, texts, backend.max_length)
    tokenize_s = time.perf_counter() - tokenize_start
    lengths = [len(ids) for ids in encoded]
    useful = sum(lengths)
    total_flops = flops.rows(lengths)
    chunk = OutputConfig.model_fields["rows_per_part"].default
    chunks = arrow_chunks(texts, chunk)
    classifier(chunks[0])  # warm-up: CUDA context, kernels, allocator
    result = {"model": name, "rows": len(texts), "tokens": useful, "tokens_mean": useful / len(texts),
              "tokens_median": statistics.median(lengths), "tokens_max": max(lengths),
              "truncated_rows": sum(truncated), "chunk_rows": chunk, "max_length": backend.max_length,
              "dtype": str(model.dtype).removeprefix("torch."),
              "attention": model.config._attn_implementation,
              "flop_model": asdict(flops), "gflop_per_row_mean": total_flops / len(texts) / 1e9,
              "load_s": round(load_s, 2), "tokenize_s": round(tokenize_s, 3),
              "hf": [], "model_only": [], "dense": [], "naive": [], "notes": []}
    naive_time = len(profile.naive_batches) * (profile.naive_s + 3)  # + loading and warm-up
    hf_deadline = deadline - naive_time

    for i, micro_batch in enumerate(profile.micro_batches):
        if i and time.monotonic() > hf_deadline:
            result["notes"].append(f"hf at micro_batch_size {micro_batch}: skipped, the part's time was spent")
            continue
        seconds = hf_actor(classifier, backend, chunks, micro_batch, profile.repeats, hf_deadline)
        padded = padded_tokens(lengths, chunk, micro_batch)
        result["hf"].append({"micro_batch_size": micro_batch, "parts_per_call": 1,
                             "runs_s": [round(s, 3) for s in seconds],
                             "padded_tokens": padded, "padding_share": 1 - useful / padded,
                             **rate(len(texts), useful, total_flops, statistics.median(seconds),
                                    matmul_tflops)})
        # The same rows already tokenised, in one call sorted over all of them: the
        # difference is the actor's tokenising, Arrow work and per-chunk sorting.
        model_s = wall_seconds(partial(predict_probs, model, tokenizer, texts, backend.max_length,
                                       micro_batch, device, encoded))
        result["model_only"].append({"micro_batch_size": micro_batch,
                                     "padded_tokens": padded_tokens(lengths, len(texts), micro_batch),
                                     **rate(len(texts), useful, total_flops, model_s, matmul_tflops)})
        result["dense"].append(dense_forward(model, micro_batch, device, len(tokenizer),
                                             matmul_tflops, flops))
    # The GPU defaults together: 128-row micro-batches (the profile's second) sorted over
    # the rows of output.parts_per_call chunks, as one call gets them; then with length
    # buckets, and with buckets and cuDNN attention (most telling first: time may run out).
    micro_batch, call_rows = profile.micro_batches[1], chunk * GPU_PARTS_PER_CALL
    for multiple, cudnn in ((1, False), (BUCKET, True), (BUCKET, False)):
        what = f"{GPU_PARTS_PER_CALL} parts a call, buckets of {multiple}, cuDNN {cudnn}"
        if time.monotonic() > hf_deadline:
            result["notes"].append(f"hf at {what}: skipped, the part's time was spent")
            continue
        seconds = hf_actor(classifier, backend, arrow_chunks(texts, call_rows), micro_batch,
                           profile.repeats, hf_deadline, multiple, cudnn)
        padded = padded_tokens(lengths, call_rows, micro_batch, multiple)
        result["hf"].append({"micro_batch_size": micro_batch, "parts_per_call": GPU_PARTS_PER_CALL,
                             "pad_to_multiple_of": multiple, "cudnn_attention": cudnn,
                             "runs_s": [round(s, 3) for s in seconds], "padded_tokens": padded,
                             "padding_share": 1 - useful / padded,
                             **rate(len(texts), useful, total_flops, statistics.median(seconds),
                                    matmul_tflops)})
    result["shape_cost"] = shape_cost(model, device, len(tokenizer))
    result["peak_memory_gib"] = peak_memory_gib(device)
    del classifier, model
    free_device_memory(device)

    for batch_size in profile.naive_batches:
        left = deadline - time.monotonic()
        if left < 3:
            result["notes"].append(f"naive pipeline at batch_size {batch_size}: skipped, the part's time was spent")
            continue
        result["naive"].append(naive_pipeline(folder, texts, lengths, batch_size, device,
                                              min(profile.naive_s, left - 2), flops, matmul_tflops))
        free_device_memory(device)
    if result["hf"] and result["naive"]:
        naive = result["naive"][0]["rows_per_s"]  # the loop a user writes first
        for entry in result["hf"]:
            entry["x_naive"] = entry["rows_per_s"] / naive
    return result


# --- part: fine-tuning and merge ----------------------------------------------------------------

class StepClock(TrainerCallback):
    """Wall time of every optimizer step, batch loading included, synchronised so each step's
    GPU work counts in that step; stops training once the deadline has passed."""

    def __init__(self, device: str, deadline: float):
        self.device, self.deadline = device, deadline
        self.marks: list[float] = []

    def _mark(self) -> None:
        synchronize(self.device)
        self.marks.append(time.perf_counter())

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.marks:
            self._mark()

    def on_step_end(self, args, state, control, **kwargs):
        self._mark()
        if time.monotonic() > self.deadline:
            control.should_training_stop = True

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def finetune_config(base: Path, adapter: Path, profile: Profile, device: str) -> FinetuneConfig:
    """The config a user would write; train.path is never read (the rows are made here)."""
    return validate({
        "base_model": str(base),
        "train": {"path": "random-tokens", "label_column": "label"},
        "training": {"quantization": "nf4", "lora_r": 64, "lora_alpha": 64,
                     "gradient_checkpointing": True, "batch_size": profile.batch_size,
                     "max_length": profile.seq_len, "epochs": 1,
                     "use_gpu": device.startswith("cuda")},
        "output": {"path": str(adapter)},
    }, model=FinetuneConfig, source="bench/gpu.py")


def quantization_used(model) -> str:
    # build_trainable falls back to plain LoRA (with only a log warning) where bitsandbytes
    # cannot run: the report says what actually trained.
    return "nf4" if any(type(m).__name__ == "Linear4bit" for m in model.modules()) else "none"


def save_adapter(trainer: Trainer, tokenizer, cfg: FinetuneConfig, quantization: str) -> Path:
    """The adapter folder as `clsjob finetune` leaves it, with the summary keys merge reads."""
    out = Path(cfg.output.path)
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    (out / SUMMARY).write_text(json.dumps({"base_model": cfg.base_model, "method": cfg.training.method,
                                           "quantization": quantization, "labels": list(LABELS.names)}))
    return out


def folder_gib(folder: Path) -> float:
    return folder_mib(folder) / 2**10


def train_steps(cfg: FinetuneConfig, profile: Profile, device: str, workdir: Path,
                deadline: float) -> tuple[dict, Path]:
    """QLoRA steps on random batches; returns the measurements and the saved adapter."""
    load_start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.base_model)
    model = build_trainable(cfg.base_model, LABELS, cfg.training, tokenizer, device)
    load_s = time.perf_counter() - load_start
    quantization = quantization_used(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = profile.warmup_steps + profile.timed_steps
    rows = random_training_rows(tokenizer, model.config.vocab_size, steps * profile.batch_size,
                                profile.seq_len)
    clock = StepClock(device, deadline)
    trainer = Trainer(model=model, args=training_arguments(cfg, str(workdir / "hf"), has_eval=False),
                      train_dataset=rows, data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[clock])
    trainer.train()
    peak = peak_memory_gib(device)  # read before saving: the training's own peak
    timed = clock.step_seconds()[profile.warmup_steps:]
    mean_s = statistics.mean(timed) if timed else None
    adapter = save_adapter(trainer, tokenizer, cfg, quantization)
    return {"quantization": quantization, "trainable_params": trainable, "load_s": round(load_s, 2),
            "bf16": trainer.args.bf16, "steps_run": len(clock.step_seconds()),
            "warmup_steps": profile.warmup_steps, "timed_steps": len(timed),
            "step_seconds": [round(x, 4) for x in clock.step_seconds()], "mean_step_s": mean_s,
            "batch_size": profile.batch_size, "seq_len": profile.seq_len,
            "tokens_per_step": profile.batch_size * profile.seq_len,
            "tokens_per_s": profile.batch_size * profile.seq_len / mean_s if mean_s else None,
            "peak_memory_gib": peak}, adapter


def finetune_and_merge(name: str, profile: Profile, device: str, workdir: Path,
                       deadline: float) -> dict:
    family, shape = profile.shapes[name]
    train_deadline = deadline - MERGE_SHARE * (deadline - time.monotonic())
    base = build_random_classifier(workdir / name, family, shape, device)
    cfg = finetune_config(base, workdir / f"{name}-adapter", profile, device)
    result, adapter = train_steps(cfg, profile, device, workdir / f"{name}-train", train_deadline)
    result["model"] = name
    free_device_memory(device)
    if time.monotonic() > deadline:
        result["merge_note"] = "merge skipped: the part's budget was spent by then"
        return result
    merge_start = time.perf_counter()
    merged = merge(validate({"adapter": str(adapter), "output": str(workdir / f"{name}-merged")},
                            model=MergeConfig))
    result.update(merge_s=time.perf_counter() - merge_start, merged_gib=folder_gib(Path(merged)))
    return result


# --- running and reporting ----------------------------------------------------------------------

def run_part(report: dict, name: str, budget_s: float, clock: Clock,
             part: Callable[[float], dict], device: str) -> dict | None:
    """part(deadline) if the overall budget still holds this part's; otherwise, or when
    it fails, a note says why, and the parts after it still run."""
    if clock.left() < budget_s:
        report["notes"].append(f"{name}: skipped, {clock.left():.0f} s left overall and the part "
                               f"is given {budget_s:.0f} s")
        return None
    start = time.monotonic()
    try:
        result = part(clock.deadline(budget_s))
        result["part_s"] = round(time.monotonic() - start, 1)
        print(f"bench/gpu.py: {name} done in {result['part_s']} s "
              f"({time.monotonic() - STARTED:.0f} s so far)", flush=True)
        return result
    except Exception as err:  # noqa: BLE001 - one failed part must not cost the others' numbers
        traceback.print_exc()
        report["notes"].append(f"{name}: failed after {time.monotonic() - start:.0f} s: "
                               f"{type(err).__name__}: {err}")
        return None
    finally:
        free_device_memory(device)


def choose_device(smoke: bool) -> str:
    if smoke:
        return "cpu"
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here; use --smoke to check the code paths on CPU")
    return "cuda:0"


def environment(device: str, source: str | None) -> dict:
    cuda = device.startswith("cuda")
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "transformers": package_version("transformers"), "peft": package_version("peft"),
            "bitsandbytes": package_version("bitsandbytes"), "python": platform.python_version(),
            "cpu": cpu_name(), "cpu_cores": os.cpu_count(), "source": source or git_commit()}


def write_report(report: dict, out: Path) -> None:
    # Written after every part: a run killed by the outer timeout keeps what it measured.
    out.parent.mkdir(parents=True, exist_ok=True)
    report["wall_s"] = round(time.monotonic() - STARTED, 1)
    report["ray_imported"] = "ray" in sys.modules
    out.write_text(json.dumps(report, indent=2))


def cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    mm = report.get("matmul")
    lines = [f"matmul {cell(mm and mm['size'], 'd')}² {cell(mm and mm['tflops'], '.1f')} TFLOP/s "
             f"(median round {cell(mm and mm['tflops_median'], '.1f')})", "",
             "| model | path | micro-batch | rows/s | tokens/s | TFLOP/s | MFU | padding | x naive |",
             "|" + "---|" * 9]
    for name, inf in report["inference"].items():
        for path in ("hf", "model_only", "dense", "naive"):
            for e in inf[path]:
                batch = e.get("micro_batch_size", e.get("batch_size"))
                if e.get("parts_per_call", 1) > 1:
                    batch = f"{batch}, {e['parts_per_call']} parts a call"
                if e.get("pad_to_multiple_of", 1) > 1:
                    batch += f", buckets of {e['pad_to_multiple_of']}"
                if e.get("cudnn_attention"):
                    batch += ", cuDNN attention"
                lines.append(f"| {name} | {path} | {batch} | {e['rows_per_s']:,.0f} | "
                             f"{e['tokens_per_s']:,.0f} | {e['achieved_tflops']:.1f} | "
                             f"{cell(e['mfu'], '.1%')} | {cell(e.get('padding_share'), '.1%')} | "
                             f"{cell(e.get('x_naive'), '.1f')} |")
    for name, inf in report["inference"].items():
        cost = inf.get("shape_cost")
        if cost:
            lines.append(f"- {name}: a forward of {cost['rows']} rows on a new shape / the same again: "
                         + "; ".join(f"{kernels} {cost[kernels]['new_shape_ms']:.1f} / "
                                     f"{cost[kernels]['same_shape_ms']:.1f} ms"
                                     for kernels in ("default", "gpu_attention")))
    ft = report.get("qlora")
    if ft:
        lines += ["", "| QLoRA | quantization | trainable M | steps timed | mean step s | tokens/s | "
                  "peak GiB | merge s | merged GiB |", "|" + "---|" * 9,
                  f"| {ft['model']}, {ft['batch_size']} x {ft['seq_len']} | {ft['quantization']} | "
                  f"{ft['trainable_params'] / 1e6:.1f} | {ft['timed_steps']} | "
                  f"{cell(ft['mean_step_s'], '.3f')} | {cell(ft['tokens_per_s'], ',.0f')} | "
                  f"{ft['peak_memory_gib']:.2f} | {cell(ft.get('merge_s'), '.1f')} | "
                  f"{cell(ft.get('merged_gib'), '.2f')} |"]
        if "merge_note" in ft:
            lines.append(f"- note: qlora: {ft['merge_note']}")
    lines += [f"- note: {note}" for note in report["notes"]]
    lines += [f"- note: {name}: {note}" for name, inf in report["inference"].items()
              for note in inf["notes"]]
    return "\n".join(lines)


def benchmark(args: argparse.Namespace, profile: Profile, device: str, workdir: Path) -> dict:
    total_s = args.budget_s or profile.total_s + profile.real_model_s * len(args.real_model)
    clock = Clock(total_s)
    out = Path(args.out)
    report = {"mode": "smoke" if args.smoke else "gpu", "environment": environment(device, args.source),
              "profile": asdict(profile), "budget_s": total_s,
              "imports_s": round(time.monotonic() - STARTED, 1),
              "matmul": None, "inference": {}, "qlora": None, "notes": []}
    if device == "cpu":
        report["notes"].append("peak GiB on CPU is the process's peak RSS so far "
                               "(peak_memory_gib), not each part's own")
    budget = profile.budget_s

    report["matmul"] = run_part(report, "matmul", budget["matmul"], clock,
                                lambda deadline: matmul_rate(profile.matmul_size, device, deadline),
                                device)
    write_report(report, out)
    matmul_tflops = report["matmul"] and report["matmul"]["tflops"]

    for name, (family, shape) in profile.shapes.items():
        def part(deadline: float, name=name, family=family, shape=shape) -> dict:
            folder = build_random_classifier(workdir / name, family, shape, device)
            return inference(name, folder, profile, device, deadline, matmul_tflops)

        result = run_part(report, name, budget[name], clock, part, device)
        if result:
            report["inference"][name] = result
        write_report(report, out)

    report["qlora"] = run_part(report, "qlora", budget["qlora"], clock,
                               lambda deadline: finetune_and_merge(profile.finetune_model, profile,
                                                                   device, workdir, deadline),
                               device)
    write_report(report, out)

    for folder in map(Path, args.real_model):
        name = f"{folder.name} (real weights)"
        result = run_part(report, name, profile.real_model_s, clock,
                          lambda deadline, folder=folder, name=name: inference(
                              name, folder, profile, device, deadline, matmul_tflops), device)
        if result:
            report["inference"][name] = result
        write_report(report, out)
    return report


def main() -> int:
    args = parse_args()
    if args.pack:
        return pack_real_model(*map(Path, args.pack))
    profile = SMOKE if args.smoke else FULL
    device = choose_device(args.smoke)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="clsjob-gpu-bench-")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = benchmark(args, profile, device, workdir)
    finally:
        if not args.workdir:  # ours alone: a few GB of model folders on a GPU
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(markdown(report))
    print(f"\nwrote {args.out} ({report['wall_s']:.0f} s)")
    # The GPU machine has no Ray: an import of it anywhere in these code paths would fail
    # there, so the smoke run fails here first.
    if report["ray_imported"]:
        print("bench/gpu.py: Ray was imported", file=sys.stderr)
        return 1
    missing = [part for part in ("matmul", "qlora") if not report[part]]
    missing += [name for name in [*profile.shapes, *(f"{Path(f).name} (real weights)" for f in args.real_model)]
                if name not in report["inference"]]
    if args.smoke and missing:
        print(f"bench/gpu.py: smoke run lacks {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
