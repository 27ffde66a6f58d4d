"""GPU benchmark: QLoRA fine-tuning and merge, and the `hf` back end's rows/s and model FLOP
utilisation, on models shaped exactly like Qwen2.5-0.5B and Qwen2.5-1.5B with random weights
(no model can be downloaded on the GPU machine; speed and memory do not depend on the values).

    bench/gpu.sh                                                      # on the GPU machine
    .venv/bin/python bench/gpu.py --smoke --out /tmp/gpu-smoke.json   # CPU, tiny shapes, < 3 min

Parts, cheapest first, each with a time budget; a part the remaining time cannot fit is
skipped with a note, so the whole run ends within --budget-s (default 450 s on a GPU):

  matmul     torch.matmul of two 8192 x 8192 bf16 matrices, timed by CUDA events: the rate
             the model FLOP utilisation is measured against
  inference  HFClassifier (the Ray Data actor of the `hf` back end, called directly) on
             2,000 rows with IMDB-like lengths, 0.5B shape, bf16: rows/s, tokens/s, MFU
  finetune   per shape: build_trainable (NF4 QLoRA, LoRA r 64 / alpha 64, gradient
             checkpointing) under the HF Trainer with the project's training_arguments (bf16)
             on random 32 x 512-token batches: step time, tokens/s, peak GPU memory; then the
             adapter saved and `merge`d: merge wall time and merged folder size

With --smoke every part runs the same code on CPU with tiny Qwen2 shapes, in fp32.
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
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

STARTED = time.monotonic()  # the overall budget counts the heavy imports below too
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # run as a script from a checkout, installed or not

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from transformers import (DataCollatorWithPadding, Qwen2Config, Qwen2ForSequenceClassification,  # noqa: E402
                          Trainer, TrainerCallback)

from clsjob.backends.hf import HFClassifier, encode_truncating, inference_dtype  # noqa: E402
from clsjob.config import BackendConfig, FinetuneConfig, MergeConfig, ResourcesConfig, validate  # noqa: E402
from clsjob.finetune.merge import merge  # noqa: E402
from clsjob.finetune.model import build_trainable, load_tokenizer  # noqa: E402
from clsjob.finetune.train import SUMMARY, peak_memory_gib  # noqa: E402
from clsjob.finetune.trainer import training_arguments  # noqa: E402
from clsjob.labels import LabelSet  # noqa: E402
from tiny_models import build_tokenizer  # noqa: E402

LABELS = LabelSet(("world", "sports", "business", "science"))
# Qwen2.5 checkpoints ship in bf16; build_trainable and the hf back end cast on load as they
# would a real one.
STORED_DTYPE = torch.bfloat16
QWEN25 = dict(vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
              hidden_act="silu", use_sliding_window=False)
FULL_SHAPES = {
    "qwen2.5-0.5b": dict(QWEN25, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864,
                         max_position_embeddings=32768),
    # max_position_embeddings changes no compute at 512 tokens; 131072 as Qwen2.5-1.5B ships.
    "qwen2.5-1.5b": dict(QWEN25, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960,
                         max_position_embeddings=131072),
}
SMOKE_SHAPES = {
    "tiny-64": dict(QWEN25, vocab_size=1024, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                    max_position_embeddings=1024),
    "tiny-128": dict(QWEN25, vocab_size=1024, hidden_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                     max_position_embeddings=1024),
}
MERGE_SHARE = 0.4  # of a fine-tuning part's budget, kept for saving the adapter and merging
MATMUL_CALLS = 50  # per timed round: ~80 ms at 8192 on an H200, so event overhead vanishes


@dataclass(frozen=True)
class Profile:
    """How big each part is: the real shapes on a GPU, tiny ones for --smoke on CPU."""
    shapes: dict[str, dict]
    inference_model: str
    batch_size: int
    seq_len: int
    warmup_steps: int
    timed_steps: int
    rows: int
    repeats: int
    matmul_size: int
    total_s: float
    budget_s: dict[str, float]  # per part: "matmul", "inference", and each shape's name


FULL = Profile(shapes=FULL_SHAPES, inference_model="qwen2.5-0.5b", batch_size=32, seq_len=512,
               warmup_steps=3, timed_steps=15, rows=2000, repeats=3, matmul_size=8192,
               total_s=450,  # bench/gpu.sh kills at 480 s
               budget_s={"matmul": 20, "inference": 100, "qwen2.5-0.5b": 120, "qwen2.5-1.5b": 170})
SMOKE = Profile(shapes=SMOKE_SHAPES, inference_model="tiny-64", batch_size=4, seq_len=64,
                warmup_steps=1, timed_steps=3, rows=64, repeats=2, matmul_size=256,
                total_s=175, budget_s={"matmul": 10, "inference": 35, "tiny-64": 45, "tiny-128": 45})


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: proves the code paths")
    p.add_argument("--budget-s", type=float, default=None,
                   help="overall time limit, imports included (default: 450 on GPU, 175 smoke)")
    p.add_argument("--workdir", default=None, help="model folders (default: a temp dir, removed)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu.json"))
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


def free_device_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        # Each part's peak is its own, not the largest of every part so far.
        torch.cuda.reset_peak_memory_stats()


# --- models and rows ----------------------------------------------------------------------------

def build_random_classifier(folder: Path, shape: dict, device: str) -> Path:
    """A merged-classifier folder (weights, tokenizer, id2label) with random weights."""
    if (folder / "config.json").exists():
        return folder
    tokenizer = build_tokenizer(folder)  # a few hundred tokens: ids above it are still valid model inputs
    config = Qwen2Config(**shape, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         id2label=LABELS.id2label(), label2id=LABELS.label2id())
    torch.manual_seed(0)
    with torch.device(device):  # random init of 1.5B parameters takes seconds on a GPU, not a minute
        model = Qwen2ForSequenceClassification(config)
    model.to(STORED_DTYPE).save_pretrained(folder)
    del model
    free_device_memory(device)
    return folder


def random_training_rows(tokenizer, vocab_size: int, rows: int, seq_len: int) -> list[dict]:
    """Rows shaped like the project's `encode` output, every one exactly seq_len tokens."""
    generator = torch.Generator().manual_seed(0)
    # Above every special id: the head pools on the last token that is not the pad token.
    ids = torch.randint(max(tokenizer.all_special_ids) + 1, vocab_size, (rows, seq_len),
                        generator=generator)
    golds = torch.randint(0, len(LABELS), (rows,), generator=generator)
    return [{"input_ids": row.tolist(), "attention_mask": [1] * seq_len, "labels": int(gold)}
            for row, gold in zip(ids, golds)]


def single_token_words(tokenizer) -> list[str]:
    """Words (with their leading space) that the tokenizer keeps as one token each: a text of
    n of them is exactly n tokens. "Ġ" is byte-level BPE's mark for a leading space."""
    candidates = sorted(" " + t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha())
    return [w for w in candidates if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]


def imdb_like_texts(tokenizer, rows: int, seed: int = 0) -> list[str]:
    """Random-word texts whose token counts are drawn like IMDB reviews': log-normal with a
    median of 220 and a mean near 290 tokens, about one in eight longer than 512 (cut by the
    back end, as real reviews are)."""
    rng = random.Random(seed)
    words = single_token_words(tokenizer)
    lengths = [max(8, min(2500, round(rng.lognormvariate(math.log(220), 0.75)))) for _ in range(rows)]
    return ["".join(rng.choice(words) for _ in range(n)) for n in lengths]


def arrow_chunks(texts: list[str], size: int) -> list[pa.Table]:
    """The chunks Ray Data hands the actor: `resources.batch_size` rows with the prepare
    stage's `error` column (all null: every row is to be labelled)."""
    table = pa.table({"text": texts, "error": pa.array([None] * len(texts), pa.string())})
    return [table.slice(start, size) for start in range(0, len(texts), size)]


# --- part: matmul rate --------------------------------------------------------------------------

def matmul_rate(size: int, device: str, deadline: float) -> dict:
    """FLOP/s of square matmuls in the dtype the hf back end computes in (bf16 on a GPU)."""
    dtype = inference_dtype(device)
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

def forward_flops(model, lengths: list[int]) -> float:
    """Useful FLOPs of forward passes over rows of these token counts (padding not counted):
    2 x non-embedding parameters per token (one multiply-add per weight; the embedding is a
    lookup), plus per row 2 x 2 x layers x seq^2 x hidden for the attention scores and their
    weighted sum (the full square, as PaLM's MFU counts it, though a causal kernel may skip
    half of it)."""
    c = model.config
    weights = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return float(sum(2 * weights * s + 4 * c.num_hidden_layers * s * s * c.hidden_size for s in lengths))


def inference(folder: Path, profile: Profile, device: str, deadline: float,
              matmul_tflops: float | None) -> dict:
    """The hf back end's hot path: its actor class, called on Arrow chunks as Ray Data calls it."""
    backend = BackendConfig(model=str(folder))  # defaults a user gets: max_length 512, micro-batch 32
    classifier = HFClassifier(backend, LABELS, "text", use_gpu=device.startswith("cuda"))
    texts = imdb_like_texts(classifier.tokenizer, profile.rows)
    encoded, truncated = encode_truncating(classifier.tokenizer, texts, backend.max_length)
    lengths = [len(ids) for ids in encoded]
    chunks = arrow_chunks(texts, ResourcesConfig().batch_size)
    classifier(chunks[0].slice(0, backend.micro_batch_size))  # warm-up: CUDA context, kernels
    seconds = []
    while len(seconds) < profile.repeats and (not seconds or time.monotonic() < deadline):
        start = time.perf_counter()
        # Each call copies its probabilities to the host, so the GPU work is inside the clock.
        labelled = [classifier(chunk) for chunk in chunks]
        seconds.append(time.perf_counter() - start)
    if any(table.column("label").null_count for table in labelled):
        raise RuntimeError("the hf back end left rows without a label")
    s = statistics.median(seconds)
    achieved = forward_flops(classifier.model, lengths) / s / 1e12
    return {"rows": len(texts), "tokens": sum(lengths), "tokens_mean": sum(lengths) / len(lengths),
            "tokens_max": max(lengths), "truncated_rows": sum(truncated),
            "max_length": backend.max_length, "micro_batch_size": backend.micro_batch_size,
            "dtype": str(classifier.model.dtype).removeprefix("torch."),
            "attention": classifier.model.config._attn_implementation,
            "seconds": [round(x, 3) for x in seconds], "median_s": s,
            "rows_per_s": len(texts) / s, "tokens_per_s": sum(lengths) / s,
            "achieved_tflops": achieved,
            "mfu": achieved / matmul_tflops if matmul_tflops else None,
            "peak_memory_gib": peak_memory_gib(device)}


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
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**30


def train_steps(cfg: FinetuneConfig, profile: Profile, device: str, workdir: Path,
                deadline: float) -> tuple[dict, Path]:
    """QLoRA steps on random batches; returns the measurements and the saved adapter."""
    tokenizer = load_tokenizer(cfg.base_model)
    model = build_trainable(cfg.base_model, LABELS, cfg.training, tokenizer, device)
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
    return {"quantization": quantization, "trainable_params": trainable,
            "bf16": trainer.args.bf16, "steps_run": len(clock.step_seconds()),
            "warmup_steps": profile.warmup_steps, "timed_steps": len(timed),
            "step_seconds": [round(x, 4) for x in clock.step_seconds()], "mean_step_s": mean_s,
            "tokens_per_step": profile.batch_size * profile.seq_len,
            "tokens_per_s": profile.batch_size * profile.seq_len / mean_s if mean_s else None,
            "peak_memory_gib": peak}, adapter


def finetune_and_merge(name: str, profile: Profile, device: str, workdir: Path,
                       deadline: float) -> dict:
    train_deadline = deadline - MERGE_SHARE * (deadline - time.monotonic())
    base = build_random_classifier(workdir / name, profile.shapes[name], device)
    cfg = finetune_config(base, workdir / f"{name}-adapter", profile, device)
    result, adapter = train_steps(cfg, profile, device, workdir / f"{name}-train", train_deadline)
    free_device_memory(device)
    if time.monotonic() > deadline:
        result["merge_note"] = "merge skipped: the part's budget was spent by then"
        return result
    merge_start = time.perf_counter()
    merged = merge(validate({"adapter": str(adapter), "output": str(workdir / f"{name}-merged")},
                            model=MergeConfig))
    result.update(merge_s=time.perf_counter() - merge_start, merged_gib=folder_gib(merged))
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


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_commit() -> str | None:
    # The GPU machine gets a copy of the working tree, maybe without .git or git itself.
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.strip() or None


def environment(device: str) -> dict:
    cuda = device.startswith("cuda")
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "transformers": package_version("transformers"), "peft": package_version("peft"),
            "bitsandbytes": package_version("bitsandbytes"), "python": platform.python_version(),
            "cpu_cores": os.cpu_count(), "clsjob_commit": git_commit()}


def write_report(report: dict, out: Path) -> None:
    # Written after every part: a run killed by the outer timeout keeps what it measured.
    out.parent.mkdir(parents=True, exist_ok=True)
    report["wall_s"] = round(time.monotonic() - STARTED, 1)
    out.write_text(json.dumps(report, indent=2))


def cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    lines = ["| fine-tuning (QLoRA, random weights) | quantization | trainable M | steps timed | "
             "mean step s | tokens/s | peak GiB | merge s | merged GiB |", "|" + "---|" * 9]
    for name, r in report["finetune"].items():
        lines.append(f"| {name}, {report['profile']['batch_size']} x {report['profile']['seq_len']} | "
                     f"{r['quantization']} | {r['trainable_params'] / 1e6:.1f} | {r['timed_steps']} | "
                     f"{cell(r['mean_step_s'], '.3f')} | {cell(r['tokens_per_s'], ',.0f')} | "
                     f"{r['peak_memory_gib']:.2f} | {cell(r.get('merge_s'), '.1f')} | "
                     f"{cell(r.get('merged_gib'), '.2f')} |")
    lines += ["", "| inference (hf back end) | rows | tokens | median s | rows/s | tokens/s | "
              "achieved TFLOP/s | matmul TFLOP/s | MFU |", "|" + "---|" * 9]
    inf, mm = report.get("inference"), report.get("matmul")
    if inf:
        lines.append(f"| {report['profile']['inference_model']}, {inf['dtype']} | {inf['rows']} | "
                     f"{inf['tokens']:,} | {inf['median_s']:.2f} | {inf['rows_per_s']:,.1f} | "
                     f"{inf['tokens_per_s']:,.0f} | {inf['achieved_tflops']:.2f} | "
                     f"{cell(mm and mm['tflops'], '.2f')} | {cell(inf['mfu'], '.1%')} |")
    lines += [f"- note: {note}" for note in report["notes"]]
    lines += [f"- note: {name}: {r['merge_note']}" for name, r in report["finetune"].items()
              if "merge_note" in r]
    return "\n".join(lines)


def benchmark(args: argparse.Namespace, profile: Profile, device: str, workdir: Path) -> dict:
    clock = Clock(args.budget_s or profile.total_s)
    out = Path(args.out)
    report = {"mode": "smoke" if args.smoke else "gpu", "environment": environment(device),
              "profile": asdict(profile), "budget_s": args.budget_s or profile.total_s,
              "matmul": None, "inference": None, "finetune": {}, "notes": []}
    if device == "cpu":
        report["notes"].append("peak GiB on CPU is the process's peak RSS so far "
                               "(peak_memory_gib), not each part's own")
    budget = profile.budget_s

    report["matmul"] = run_part(report, "matmul", budget["matmul"], clock,
                                lambda deadline: matmul_rate(profile.matmul_size, device, deadline),
                                device)
    write_report(report, out)

    def inference_part(deadline: float) -> dict:
        name = profile.inference_model
        folder = build_random_classifier(workdir / name, profile.shapes[name], device)
        return inference(folder, profile, device, deadline,
                         report["matmul"] and report["matmul"]["tflops"])

    report["inference"] = run_part(report, "inference", budget["inference"], clock, inference_part, device)
    write_report(report, out)

    for name in profile.shapes:
        result = run_part(report, f"finetune {name}", budget[name], clock,
                          lambda deadline: finetune_and_merge(name, profile, device, workdir, deadline),
                          device)
        if result:
            report["finetune"][name] = result
        write_report(report, out)
    return report


def main() -> int:
    args = parse_args()
    profile = SMOKE if args.smoke else FULL
    device = choose_device(args.smoke)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="clsjob-gpu-bench-")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = benchmark(args, profile, device, workdir)
    finally:
        if not args.workdir:  # ours alone: up to ~10 GB of model folders on a GPU
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(markdown(report))
    print(f"\nwrote {args.out} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
