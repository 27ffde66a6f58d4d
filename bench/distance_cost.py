"""What `abstain.score: distance` costs the `hf` back end: rows/s of the actor with and without
the kNN score, on the same model and rows, runs alternated so that drift in the machine's
load falls on both sides.

The model is a classifier folder with a 77-way head on all-MiniLM-L6-v2 (or all-mpnet-base-v2)
and an index of `--index-rows` training rows of Banking77 embedded by it (their distances are
what matters for the cost, not the head's training: the work per row is the same), so the run
needs no fine-tune. Rows: Banking77 test (3,080), in chunks of 1,024 as Ray Data hands them.

    .venv/bin/python bench/distance_cost.py [--model minilm|mpnet] [--index-rows 10000]
        [--runs 3] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import DATA, REPO, environment, environment_line, markdown_table, model_folder, write_report

CHUNK = 1024


def build_folder(base: Path, folder: Path, index_rows: int, k: int) -> int:
    """A classifier folder on `base` with Banking77's labels and a distance index of
    `index_rows` of its train rows (class-balanced) embedded by the folder's own model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from clsjob import model_folder as contract
    from clsjob.backends.hf import encode_truncating, predict
    from clsjob.evaluation.distance import balanced_sample, knn_index

    table = pq.read_table(DATA / "banking77.parquet")
    train = table.filter(pc.equal(table.column("split"), "train"))
    names = sorted(set(train.column("label").to_pylist()))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    gold = np.array([names.index(g) for g in train.column("label").to_pylist()])
    kept = balanced_sample(gold, max(1, index_rows // len(names)))
    texts = [train.column("text")[int(i)].as_py() for i in kept]
    encoded, _ = encode_truncating(tokenizer, texts, 64)
    _, reps = predict(model, tokenizer, encoded, 32, "cpu", represent=True)
    model.config.update({contract.DISTANCE_KEY: {"k": k, "above": 0.5, "rows": len(kept)}})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    np.save(folder / contract.DISTANCE_INDEX, knn_index(reps))
    return len(kept)


def chunks() -> list[pa.Table]:
    from clsjob.config import InputConfig
    from clsjob.run.prepare import prepare_chunk

    table = pq.read_table(DATA / "banking77.parquet")
    test = table.filter(pc.equal(table.column("split"), "test")).select(["text"])
    return [prepare_chunk(test.slice(i, CHUNK), "test.parquet", i, InputConfig(path="x"))
            for i in range(0, test.num_rows, CHUNK)]


def rows_per_s(actor, parts: list[pa.Table]) -> float:
    started = time.monotonic()
    rows = sum(actor(part).num_rows for part in parts)
    return rows / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "mpnet"), default="minilm")
    parser.add_argument("--index-rows", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "distance_cost.json"))
    args = parser.parse_args()
    if not (DATA / "banking77.parquet").exists():
        print(f"no {DATA / 'banking77.parquet'}", file=sys.stderr)
        return 2
    from clsjob.backends.hf import HFClassifier
    from clsjob.config import HFBackendConfig

    env = environment()
    parts = chunks()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        indexed = build_folder(model_folder(args.model), folder, args.index_rows, args.k)
        backend = HFBackendConfig(model=str(folder), max_length=64, dtype="float32")
        actors = {"off": HFClassifier(backend, None, "text", use_gpu=False),
                  "distance": HFClassifier(backend, None, "text", use_gpu=False, distance="knn")}
        rows_per_s(actors["off"], parts[:1])  # warm-up: first-call allocations
        rows_per_s(actors["distance"], parts[:1])
        measured = {name: [] for name in actors}
        for _ in range(args.runs):
            for name, actor in actors.items():
                measured[name].append(rows_per_s(actor, parts))
    med = {name: statistics.median(v) for name, v in measured.items()}
    result = {"environment": env, "model": args.model, "index_rows": indexed, "k": args.k,
              "rows": sum(p.num_rows for p in parts), "runs": measured,
              "median_rows_per_s": med, "ratio_distance_to_off": med["distance"] / med["off"]}
    table = markdown_table(["abstention", "rows/s (median)", "runs"],
                           [[name, f"{med[name]:.1f}", ", ".join(f"{x:.1f}" for x in v)]
                            for name, v in measured.items()])
    write_report(result, Path(args.out),
                 f"\n{table}\n\nratio {result['ratio_distance_to_off']:.3f}\n\n{environment_line(env)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
