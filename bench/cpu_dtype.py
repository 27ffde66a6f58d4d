"""The `hf` back end in float32 against bfloat16 on this CPU: rows/s, and whether the labels
stay the same, on fine-tuned all-MiniLM-L6-v2 models and real held-out rows (SST-2 dev,
Banking77 test).

    .venv/bin/python bench/finetune_accuracy.py --keep MODELS   # the fine-tuned models
    .venv/bin/python bench/cpu_dtype.py --models MODELS [--runs 5] [--out FILE.json]

Each corpus's rows are labelled by the back end's own actor (built as the pipeline builds
it, in this process, with as many torch threads as the machine has cores), once per dtype
per run, the two dtypes taking turns so drifts in the machine's speed hit both alike. A
first pass per dtype warms up and is not timed. Targets (`TARGETS["cpu_dtype"]`): at least
99.5% of rows with the same label and accuracy within 0.3 point; the speed-up is reported
against the CPU's bf16 support, not held to a number.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import (DATA, REPO, TARGETS, classify_config, environment, environment_line,
                    make_actor, markdown_table, prepared_chunks, write_report)

SPLITS = {"sst2": "dev", "banking77": "test"}
DTYPES = ("float32", "bfloat16")
ROWS_PER_CHUNK = 512
MAX_LENGTH = 64  # as the models were fine-tuned (bench/finetune_accuracy.py)


def eval_rows(corpus: str) -> pa.Table:
    table = pq.read_table(DATA / f"{corpus}.parquet")
    table = table.filter(pc.equal(table.column("split"), SPLITS[corpus]))
    return table.select(["text", "label"])


def build_actor(model: Path, dtype: str, workdir: Path):
    cfg = classify_config(workdir, workdir / "unused", {"model": str(model), "max_length": MAX_LENGTH,
                                                         "dtype": dtype}, rows_per_part=ROWS_PER_CHUNK)
    return make_actor(cfg)


def label_all(actor, chunks: list[pa.Table]) -> tuple[float, pa.Table]:
    started = time.perf_counter()
    out = pa.concat_tables([actor(chunk) for chunk in chunks])
    return time.perf_counter() - started, out


def compare(outputs: dict[str, pa.Table], gold: list[str]) -> dict:
    labels = {d: outputs[d].column("label").to_pylist() for d in DTYPES}
    probs = {d: np.array(outputs[d].column("probs").to_pylist(), dtype=np.float64) for d in DTYPES}
    diff = np.abs(probs["bfloat16"] - probs["float32"])
    accuracy = {d: float(np.mean([p == g for p, g in zip(labels[d], gold)])) for d in DTYPES}
    return {"same_label": float(np.mean([a == b for a, b in zip(*labels.values())])),
            "rows_with_other_label": sum(a != b for a, b in zip(*labels.values())),
            "accuracy": accuracy,
            "accuracy_change_points": round(100 * (accuracy["bfloat16"] - accuracy["float32"]), 3),
            "max_prob_diff": float(diff.max()), "mean_prob_diff": float(diff.mean())}


def measure(corpus: str, model: Path, runs: int, workdir: Path) -> dict:
    import torch

    table = eval_rows(corpus)
    chunks = prepared_chunks(table.select(["text"]), ROWS_PER_CHUNK)
    actors = {d: build_actor(model, d, workdir) for d in DTYPES}
    outputs = {d: label_all(actors[d], chunks)[1] for d in DTYPES}  # warm-up, and the labels
    seconds: dict[str, list[float]] = {d: [] for d in DTYPES}
    for _ in range(runs):
        for d in DTYPES:
            seconds[d].append(label_all(actors[d], chunks)[0])
    rates = {d: [round(table.num_rows / s, 1) for s in seconds[d]] for d in DTYPES}
    median = {d: statistics.median(rates[d]) for d in DTYPES}
    return {"corpus": corpus, "split": SPLITS[corpus], "rows": table.num_rows, "runs": runs,
            "torch_threads": torch.get_num_threads(),
            "rows_per_s": rates, "median_rows_per_s": median,
            "speedup_bf16": round(median["bfloat16"] / median["float32"], 2),
            **compare(outputs, table.column("label").to_pylist())}


def met(result: dict) -> bool:
    target = TARGETS["cpu_dtype"]
    return (result["same_label"] >= target["same_label"]
            and abs(result["accuracy_change_points"]) <= target["accuracy_points"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, required=True,
                   help="folder holding sst2/ and banking77/ (finetune_accuracy.py --keep)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "bench/results/cpu_dtype.json"))
    args = p.parse_args()
    missing = [c for c in SPLITS if not (args.models / c / "config.json").exists()]
    if missing or not DATA.exists():
        print(f"bench/cpu_dtype.py: needs {DATA} and fine-tuned models under {args.models} "
              f"(missing: {', '.join(missing) or 'none'})", file=sys.stderr)
        return 2
    from clsjob.precision import cpu_flags, resolve_dtype

    env = environment()
    flags = sorted(cpu_flags() & {"avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "avx2"})
    results = []
    for corpus in SPLITS:
        results.append(measure(corpus, args.models / corpus, args.runs, args.models))
        results[-1]["met"] = met(results[-1])
        print(results[-1], flush=True)
    report = {"environment": env, "cpu_flags": flags, "auto_dtype": resolve_dtype("auto", "cpu"),
              "target": TARGETS["cpu_dtype"], "results": results}

    def spread(rates):
        return f"{min(rates)}–{max(rates)}"
    table = markdown_table(
        ["corpus", "rows", "fp32 rows/s (median, range)", "bf16 rows/s (median, range)", "bf16/fp32",
         "same label", "acc fp32", "acc bf16", "max Δprob", "met"],
        [[f"{r['corpus']} {r['split']}", r["rows"],
          f"{r['median_rows_per_s']['float32']} ({spread(r['rows_per_s']['float32'])})",
          f"{r['median_rows_per_s']['bfloat16']} ({spread(r['rows_per_s']['bfloat16'])})",
          f"{r['speedup_bf16']}×", f"{100 * r['same_label']:.2f}% ({r['rows_with_other_label']} rows differ)",
          f"{r['accuracy']['float32']:.4f}", f"{r['accuracy']['bfloat16']:.4f}",
          f"{r['max_prob_diff']:.4f}", "yes" if r["met"] else "no"] for r in results])
    write_report(report, Path(args.out),
                 f"\n{table}\n\nCPU flags: {', '.join(flags)}; auto chooses "
                 f"{report['auto_dtype']}; {results[0]['torch_threads']} torch threads, "
                 f"{args.runs} timed runs per dtype.\n{environment_line(env)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
