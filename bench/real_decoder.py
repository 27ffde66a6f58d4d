"""The seed's QLoRA recipe on a real decoder and real data: `configs/finetune-qlora.yaml` as
shipped (NF4, LoRA r 64 on every linear layer, the head in full, lr 1e-4, cosine, warmup 5%),
with only the data paths, this machine's scale and the epochs swapped, through the path users
take — `run_finetune`, `merge` (`configs/merge.yaml`), then classify through the Ray Data
pipeline (`hf`, and `vllm_pool` where vLLM's CPU build takes the model) — on SST-2, against
TF-IDF + logistic regression trained on the same rows in the same run.

    .venv/bin/python bench/real_decoder.py --model gemma3-270m --train-rows 2000 --epochs 1
        [--quantization nf4|none] [--max-length 64] [--batch-size 32] [--eval-rows 256]
        [--backends hf,vllm_pool] [--corpus sst2] [--minilm] [--work DIR] [--out FILE.json]
        [--scored-limit N]   (a smoke test: only the first N rows of dev and of test)

Rows: SST-2 train in a fixed shuffle (seed 0); the last --eval-rows of it are the fine-tune's
eval rows (its per-epoch accuracy, keep_best and the temperature fit), the first
--train-rows (or `all` the others) are trained on. Dev (872) and test (1,821) are scored by
the classify run only, so the temperature is judged on rows it was not fitted on.

The model folders come from `make models` (bench/common.py model_folder). --work DIR keeps the
fine-tune, merged model and labelled rows there; run again with the same DIR and a finished
fine-tune is not repeated (run_finetune finds its summary).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from common import (DATA, REPO, TARGETS, LoadWatch, environment, environment_line,
                    markdown_table, model_folder, read_output, start_real_data_ray, write_report)
from finetune_accuracy import TASKS, baseline, finetune_minilm

SHUFFLE_SEED = 0
SCORED = ("dev", "test")


def split_rows(corpus: str, train_rows: int | None, eval_rows: int,
               scored_limit: int | None = None) -> dict[str, pa.Table]:
    """train (the first `train_rows` of the seeded shuffle; None: all but the eval rows),
    eval (its last `eval_rows`), dev and test (their first `scored_limit` rows: smoke tests)."""
    table = pq.read_table(DATA / f"{corpus}.parquet").select(["text", "label", "split"])
    train = table.filter(pc.equal(table.column("split"), "train"))
    order = np.random.default_rng(SHUFFLE_SEED).permutation(train.num_rows)
    pool = train.num_rows - eval_rows
    if train_rows is not None and train_rows > pool:
        raise SystemExit(f"--train-rows {train_rows}: only {pool} train rows besides the "
                         f"{eval_rows} eval rows")
    parts = {"train": train.take(order[:train_rows or pool]), "eval": train.take(order[pool:])}
    for split in SCORED:
        parts[split] = table.filter(pc.equal(table.column("split"), split)).slice(0, scored_limit)
    return parts


def write_folder(table: pa.Table, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-0.parquet")
    return folder


def finetune_config(base: Path, work: Path, args) -> tuple[dict, dict]:
    """configs/finetune-qlora.yaml with only these keys swapped; (config, what was swapped)."""
    shipped = yaml.safe_load((REPO / "configs" / "finetune-qlora.yaml").read_text())
    swapped = {
        "base_model": str(base),
        "train.path": str(work / "train"), "eval.path": str(work / "eval"),
        "training.epochs": args.epochs,
        "training.use_gpu": False, "training.workers": 1, "training.cpus_per_worker": 2,
        "training.max_length": args.max_length, "training.batch_size": args.batch_size,
        "training.quantization": args.quantization,
        "output.path": str(work / "adapter"), "output.storage_path": str(work / "ray"),
    }
    cfg = json.loads(json.dumps(shipped))
    changed = {}
    for key, value in swapped.items():
        *parents, leaf = key.split(".")
        section = cfg
        for p in parents:
            section = section[p]
        if section.get(leaf) != value:
            changed[key] = {"shipped": section.get(leaf), "here": portable(value, work)}
            section[leaf] = value
    return cfg, changed


def portable(value, work: Path):
    """A path of this machine as the results may keep it: <work>/... or <repo>/..."""
    if not isinstance(value, str):
        return value
    return value.replace(str(work), "<work>").replace(str(REPO), "<repo>")


def train_tokens(base: Path, texts: list[str], golds: list[str], max_length: int) -> int:
    """Tokens of one pass over the training rows, as the fine-tune counts them (its tokens/s
    is per these), so that tokens / (tokens/s) gives the training seconds."""
    from clsjob.finetune.data import encode, settle_labels
    from clsjob.finetune.model import load_tokenizer

    rows = encode(load_tokenizer(str(base)), texts, golds, settle_labels(None, golds), max_length)
    return sum(len(r["input_ids"]) for r in rows)


def finetune_and_merge(base: Path, work: Path, args, parts: dict) -> dict:
    from clsjob.config import FinetuneConfig, MergeConfig, validate
    from clsjob.finetune.merge import merge
    from clsjob.finetune.train import run_finetune

    cfg, changed = finetune_config(base, work, args)
    with LoadWatch() as load:
        started = time.monotonic()
        summary = run_finetune(validate(cfg, model=FinetuneConfig, source="finetune-qlora.yaml"))
        finetune_s = time.monotonic() - started
    merge_cfg = yaml.safe_load((REPO / "configs" / "merge.yaml").read_text())
    merge_cfg.update(adapter=str(work / "adapter"), output=str(work / "model"))
    started = time.monotonic()
    merge(validate(merge_cfg, model=MergeConfig, source="merge.yaml"))
    merge_s = time.monotonic() - started

    train = parts["train"]
    tokens = train_tokens(base, train.column("text").to_pylist(),
                          train.column("label").to_pylist(), args.max_length)
    train_s = tokens * args.epochs / summary["train_tokens_per_s"]
    steps_per_epoch = -(-train.num_rows // args.batch_size)
    return {
        "swapped": changed, "train_rows": summary["train_rows"], "eval_rows": summary["eval_rows"],
        "epochs": args.epochs, "train_tokens_per_epoch": tokens,
        "train_tokens_per_s": summary["train_tokens_per_s"],
        "train_s": round(train_s, 1), "train_s_per_epoch": round(train_s / args.epochs, 1),
        "s_per_step": round(train_s / (steps_per_epoch * args.epochs), 2),
        "s_per_train_row": round(train_s / (train.num_rows * args.epochs), 3),
        "finetune_wall_s": round(finetune_s, 1), "worker_wall_s": summary["wall_time_s"],
        "merge_wall_s": round(merge_s, 1), "peak_memory_gib": summary.get("peak_memory_gib"),
        "train_loss": summary["train_loss"],
        "per_epoch_eval_accuracy": [round(e["eval_accuracy"], 4) for e in summary["epochs"]],
        "final_eval": summary["final_eval"], "calibration": summary["calibration"],
        "load_average": load.summary(),
    }


def classify(kind: str, model: Path, shards: Path, out: Path, max_length: int) -> dict:
    """Dev and test through the pipeline with back end `kind`; accuracy and ECE per split,
    of the calibrated confidences (what the run wrote) and of the raw softmax."""
    from clsjob.config import ClassifyConfig, validate
    from clsjob.contract import GOLD
    from clsjob.evaluation.calibration import ece
    from clsjob.model_folder import rescale_probs
    from clsjob.run.pipeline import run_classify

    backend = {"kind": kind, "model": str(model), "max_length": max_length}
    if kind == "vllm_pool":  # 0.1-0.3 of RAM on CPU (DESIGN); one row is at most max_length
        backend["engine"] = {"max_model_len": max_length, "gpu_memory_utilization": 0.2}
    cfg = validate({"input": {"path": str(shards), "label_column": "label", "carry_columns": ["split"]},
                    "backend": backend, "resources": {"cpus_per_actor": 2},
                    "output": {"path": str(out), "overwrite": True, "rows_per_part": 512}},
                   model=ClassifyConfig, source=f"real_decoder {kind}")
    with LoadWatch() as load:
        summary = run_classify(cfg)
    manifest = json.loads((out / "_manifest.json").read_text())
    temperature = manifest.get("temperature") or 1.0
    names = json.loads((model / "config.json").read_text())["id2label"]
    index = {names[k]: int(k) for k in names}
    rows = read_output(out, ["split", GOLD, "label", "probs", "error"])
    result = {"rows": summary.rows_out, "errored": summary.rows_errored,
              "rows_per_s": round(summary.rows_per_s, 2), "wall_s": round(summary.elapsed_s, 1),
              "temperature": temperature, "dtypes": manifest.get("dtypes"),
              "load_average": load.summary()}
    for split in SCORED:
        part = rows.filter(pc.equal(rows.column("split"), split))
        gold = np.array([index[g] for g in part.column(GOLD).to_pylist()])
        probs = np.array(part.column("probs").to_pylist(), dtype=np.float64)
        raw = rescale_probs(probs, 1.0 / temperature)  # softmax(logits): T undone
        result[split] = {"rows": part.num_rows,
                         "accuracy": round(float((probs.argmax(axis=1) == gold).mean()), 4),
                         "ece_raw": round(ece(raw, gold), 4), "ece_calibrated": round(ece(probs, gold), 4)}
    return result


def minilm_reference(work: Path, max_length: int) -> dict:
    """all-MiniLM-L6-v2 fine-tuned in full on the same train and eval rows, with the settings
    bench/finetune_accuracy.py measured it with on SST-2 (3 epochs, lr 5e-5), then scored on
    dev and test by the same classify run: the encoder a user would otherwise pick, measured
    under the same load as the decoder."""
    ref = work / "minilm"
    ref.mkdir(exist_ok=True)
    for name in ("train", "eval"):  # finetune_minilm reads <its work>/train and /eval
        if not (ref / name).exists():
            (ref / name).symlink_to(work / name, target_is_directory=True)
    started = time.monotonic()
    trained = finetune_minilm(TASKS["sst2"], ref)
    result = {"epochs": TASKS["sst2"]["epochs"], "learning_rate": TASKS["sst2"]["learning_rate"],
              "per_epoch_eval_accuracy": [round(e["eval_accuracy"], 4) for e in trained["epochs"]],
              "train_tokens_per_s": trained["train_tokens_per_s"],
              "finetune_wall_s": round(time.monotonic() - started, 1)}
    return {**result, **classify("hf", ref / "model", work / "scored", work / "out-minilm", max_length)}


def run(args) -> dict:
    base = model_folder(args.model)
    parts = split_rows(args.corpus, args.train_rows, args.eval_rows, args.scored_limit)
    keep = args.work is not None
    work = Path(args.work) if keep else Path(tempfile.mkdtemp(prefix="real-decoder-"))
    try:
        for name in ("train", "eval"):
            write_folder(parts[name].select(["text", "label"]), work / name)
        write_folder(pa.concat_tables([parts[s] for s in SCORED]), work / "scored")
        train = (parts["train"].column("text").to_pylist(), parts["train"].column("label").to_pylist())
        tfidf = {s: baseline("logistic_regression", train,
                             (parts[s].column("text").to_pylist(), parts[s].column("label").to_pylist()))
                 for s in SCORED}
        ours = finetune_and_merge(base, work, args, parts)
        classified = {}
        for kind in args.backends:
            try:
                classified[kind] = classify(kind, work / "model", work / "scored",
                                            work / f"out-{kind}", args.max_length)
            except Exception as exc:  # vllm_pool may refuse the architecture: record why
                # A Ray actor's error carries the whole traceback: its last line says why.
                lines = [x for x in f"{type(exc).__name__}: {exc}".splitlines() if x.strip()]
                classified[kind] = {"error": portable(lines[-1][:1000], work),
                                    "error_head": portable(lines[0][:300], work)}
            print(json.dumps({kind: classified[kind]}, indent=2), flush=True)
        reference = minilm_reference(work, args.max_length) if args.minilm else None
        print(json.dumps({"minilm": reference}, indent=2), flush=True)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return {"finetune": ours, "classify": classified, "minilm": reference,
            "baseline": {s: {k: round(v, 4) if isinstance(v, float) else v for k, v in b.items()}
                         for s, b in tfidf.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a folder name under models/ (make models)")
    parser.add_argument("--train-rows", required=True,
                        type=lambda v: None if v == "all" else int(v), help="N, or all")
    parser.add_argument("--epochs", type=float, required=True)
    parser.add_argument("--quantization", choices=("nf4", "none"), default="nf4")
    parser.add_argument("--corpus", choices=("sst2",), default="sst2")
    parser.add_argument("--max-length", type=int, default=64, help="SST-2 sentences are short")
    parser.add_argument("--batch-size", type=int, default=32, help="the shipped 32")
    parser.add_argument("--eval-rows", type=int, default=256)
    parser.add_argument("--scored-limit", type=int,
                        help="score only the first N rows of dev and of test (smoke tests)")
    parser.add_argument("--backends", type=lambda v: v.split(","), default=["hf", "vllm_pool"])
    parser.add_argument("--minilm", action="store_true",
                        help="also fine-tune all-MiniLM-L6-v2 in full on the same rows (~15 min)")
    parser.add_argument("--work", help="keep the run's files here (default: a temporary folder)")
    parser.add_argument("--out")
    args = parser.parse_args()
    env = environment()
    if not start_real_data_ray():
        return 2
    with LoadWatch(every_s=30) as load:
        started = time.monotonic()
        result = run(args)
    rows = result["finetune"]["train_rows"]
    target = TARGETS["real_decoder"][args.corpus]
    report = {"environment": env, "model": args.model, "corpus": args.corpus,
              "quantization": args.quantization, "max_length": args.max_length,
              "batch_size": args.batch_size, "scored_limit": args.scored_limit,
              "target_dev_accuracy": target, **result,
              "wall_s": round(time.monotonic() - started, 1), "load_average": load.summary()}
    out = Path(args.out or REPO / "bench" / "results" /
               f"real_decoder-{args.model}-{rows}-{args.quantization}.json")
    ft, table = result["finetune"], []
    for kind, c in result["classify"].items():
        if "error" in c:
            table.append([kind, *["—"] * 7, c["error"][:80]])
            continue
        table.append([kind, *(f"{c[s]['accuracy']:.4f}" for s in SCORED),
                      *(f"{c[s]['ece_raw']:.3f} → {c[s]['ece_calibrated']:.3f}" for s in SCORED),
                      c["rows_per_s"], c["dtypes"], f"T {c['temperature']}", ""])
    if result["minilm"]:
        m = result["minilm"]
        table.append(["MiniLM full (hf)", *(f"{m[s]['accuracy']:.4f}" for s in SCORED),
                      *(f"{m[s]['ece_raw']:.3f} → {m[s]['ece_calibrated']:.3f}" for s in SCORED),
                      m["rows_per_s"], m["dtypes"], f"T {m['temperature']}", ""])
    table.append(["TF-IDF + LR", *(f"{result['baseline'][s]['accuracy']:.4f}" for s in SCORED),
                  "", "", "", "", "", ""])
    write_report(report, out, "\n".join([
        f"\n{args.model}, {args.quantization}, {rows} rows x {args.epochs} epochs: "
        f"{ft['train_s_per_epoch']} s/epoch, {ft['s_per_step']} s/step, "
        f"{ft['train_tokens_per_s']} tokens/s, eval-rows accuracy {ft['per_epoch_eval_accuracy']}, "
        f"eval-rows ECE {ft['calibration']['ece_before']:.3f} -> {ft['calibration']['ece_after']:.3f}"
        if ft["calibration"] else "",
        markdown_table(["back end", "dev acc", "test acc", "dev ECE raw → cal.", "test ECE raw → cal.",
                        "rows/s", "dtype", "temperature", "error"], table),
        f"\n{environment_line(env)}; load average during the run {report['load_average']}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
