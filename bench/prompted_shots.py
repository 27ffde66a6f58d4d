"""Few-shot examples chosen per row (`backend.prompt.shots`) on a real instruct LLM: zero-shot,
k fixed shots, k random shots per row and k similar shots per row, through `run_classify`
(Ray Data, one engine actor), on SST-2 dev, SMS spam (a balanced sample) and Banking77 test,
each with its own train rows as the pool.

    .venv/bin/python bench/prompted_shots.py [--model qwen2.5-coder-0.5b-instruct]
        [--corpora banking77,sst2,sms_spam] [--modes choice,score] [--rows 200] [--k 8]
        [--selects none,fixed,random,similar] [--out FILE.json]

Each run is the shipped `configs/classify-prompt-{mode}.yaml` with the data, model, labels and
the corpus's one-sentence instructions swapped in (bench/real_prompted.py), plus
`backend.prompt.shots: {pool, k, select, embedder: all-MiniLM-L6-v2}` for every select but
`none`. Per run: accuracy, macro-F1, ECE (score), rows/s end to end (engine start and pool
embedding included), and the prompt tokens a row, counted from the same prompts the actor
builds (shared_prompt, the pool's pieces and choose_shots, on the driver). Beside them, per
corpus, what the similar shots hold without any LLM: their majority vote (ties to the nearer),
the nearest one's label, and how often the gold label is among them.

Rows: SST-2 dev in file order, pool = SST-2 train; SMS spam: --rows drawn half ham, half spam
(seed 0), pool = every other row; Banking77 test in a seeded shuffle, pool = Banking77 train.
Models from `make models` (the LLM and MiniLM).
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import (DATA, REPO, LoadWatch, environment, environment_line, markdown_table,
                    model_folder, start_real_data_ray, write_report)
from real_prompted import SEED, classify_config, corpus_rows

SELECTS = ("none", "fixed", "random", "similar")
# Label descriptions where the corpus needs them: SMS spam's "ham" is jargon. `as-shipped` is
# real_prompted.py's wording (the meanings inside the instructions); `names-only` asks with the
# bare names; `descriptions` asks the same bare question and describes each label in the list.
SMS_QUESTION = "Is this SMS message spam or ham?"
WORDINGS = {
    "as-shipped": {},
    "names-only": {"instructions": SMS_QUESTION},
    "descriptions": {"instructions": SMS_QUESTION, "labels": [
        {"name": "ham", "description": "an ordinary personal message between people who know each other"},
        {"name": "spam", "description": "unsolicited advertising, prizes, premium-rate offers"}]},
}


def rows_and_pool(corpus: str, rows: int) -> tuple[pa.Table, pa.Table]:
    """(the measured rows, the pool of labelled rows their shots come from)."""
    table = pq.read_table(DATA / f"{corpus}.parquet", columns=["text", "label", "split"])
    if corpus != "sms_spam":
        train = table.filter(pc.equal(table.column("split"), "train")).select(["text", "label"])
        # The pool in a seeded shuffle: select fixed takes its first k rows.
        return corpus_rows(corpus, rows), train.take(np.random.default_rng(SEED).permutation(train.num_rows))
    table = table.select(["text", "label"])
    labels = np.array(table.column("label").to_pylist())
    rng = np.random.default_rng(SEED)
    picked = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == name), rows // 2, replace=False)
                                     for name in sorted(set(labels))]))
    rest = np.setdiff1d(np.arange(table.num_rows), picked)
    return table.take(rng.permutation(picked)), table.take(rng.permutation(rest))


def with_shots(cfg: dict, select: str, pool: Path, k: int, embedder: Path) -> dict:
    if select == "none":
        return cfg
    shots = {"pool": str(pool), "k": k, "select": select}
    if select == "similar":
        shots["embedder"] = str(embedder)
    cfg["backend"]["prompt"]["shots"] = shots
    return cfg


def prompt_tokens(cfg, table: pa.Table) -> float:
    """Mean prompt tokens a row: the prompts the actor builds, rebuilt here (no engine)."""
    from transformers import AutoTokenizer

    from clsjob.backends.vllm_prompt import pool_pieces, prompt_examples, shared_prompt
    from clsjob.embedder import Embedder
    from clsjob.labels import LabelSet
    from clsjob.prompts import encode_rows
    from clsjob.shots import choose_shots

    prompt, labels = cfg.backend.prompt, LabelSet.from_specs(cfg.labels)
    tokenizer = AutoTokenizer.from_pretrained(cfg.backend.model)
    examples, pool = prompt_examples(prompt, labels, cfg.storage)
    pieces = pool_pieces(tokenizer, prompt, pool)
    template = shared_prompt(tokenizer, labels, prompt, examples, pieces=pieces)
    texts = table.column("text").to_pylist()
    ids, _ = encode_rows(tokenizer, texts, cfg.backend.max_length)
    if pieces is None:
        return float(np.mean([len(template.build(row)) for row in ids]))
    shots = prompt.shots
    vectors = None
    if shots.select == "similar":
        embed = Embedder(shots.embedder)
        vectors = (embed(texts), embed(list(pool.texts)))
    chosen = choose_shots(shots.select, pool, texts, [f"part-0.parquet:{i}" for i in range(len(texts))],
                          shots.k, shots.per_label_min, shots.seed, *(vectors or (None, None)))
    return float(np.mean([len(template.shared.build(template.row_part(
        [t for j in rows for t in pieces[j]], row))) for rows, row in zip(chosen, ids)]))


def neighbour_vote(table: pa.Table, pool: pa.Table, embedder: Path, k: int) -> dict:
    """The k similar shots' own answer, without the LLM: a floor the prompted run should beat."""
    from collections import Counter

    from clsjob.embedder import Embedder
    from clsjob.shots import similar_shots

    texts, gold = table.column("text").to_pylist(), table.column("label").to_pylist()
    pool_texts, pool_labels = pool.column("text").to_pylist(), pool.column("label").to_pylist()
    embed = Embedder(str(embedder))
    shots = similar_shots(embed(texts), embed(pool_texts), texts, pool_texts, pool_labels, k)

    def vote(chosen: list[int]) -> str:  # the commonest label; ties to the nearer (last)
        counts = Counter(pool_labels[j] for j in chosen)
        return next(pool_labels[j] for j in reversed(chosen) if counts[pool_labels[j]] == max(counts.values()))
    return {"rows": len(texts),
            "vote_accuracy": float(np.mean([vote(c) == g for c, g in zip(shots, gold)])),
            "nearest_accuracy": float(np.mean([pool_labels[c[-1]] == g for c, g in zip(shots, gold)])),
            "gold_among_shots": float(np.mean([g in {pool_labels[j] for j in c} for c, g in zip(shots, gold)]))}


def worded(cfg: dict, changed: dict, wording: str) -> dict:
    """The config with `wording`'s instructions and labels (SMS spam only)."""
    for key, value in WORDINGS[wording].items():
        section = cfg["backend"]["prompt"] if key == "instructions" else cfg
        section[key] = changed[f"{'backend.prompt.' if key == 'instructions' else ''}{key}"] = value
    return cfg


def tfidf_floor(table: pa.Table, pool: pa.Table) -> dict:
    """TF-IDF word 1-2-grams + a linear SVM trained on the pool, scored on the rows: the
    classic floor (../shared/data/README.md's baseline) on the same split."""
    from finetune_accuracy import baseline

    return baseline("linear_svm", (pool.column("text").to_pylist(), pool.column("label").to_pylist()),
                    (table.column("text").to_pylist(), table.column("label").to_pylist()))


def run_one(mode: str, corpus: str, select: str, wording: str, table: pa.Table, pool: Path,
            labels: list[str], model: Path, embedder: Path, work: Path, args) -> dict:
    from clsjob.config import ClassifyConfig, validate
    from clsjob.run.pipeline import run_classify

    name = f"{corpus}-{mode}-{select}-{wording}"
    shards, out = work / f"{name}-in", work / f"{name}-out"
    shards.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, shards / "part-0.parquet")
    raw, changed = classify_config(mode, corpus, labels, model, shards, out, args.max_model_len)
    raw = worded(raw, changed, wording)
    cfg = validate(with_shots(raw, select, pool, args.k, embedder), model=ClassifyConfig,
                   source=f"prompted_shots {name}")
    with LoadWatch() as load:
        summary = run_classify(cfg)
    metrics = json.loads((out / "_metrics.json").read_text())
    return {"rows": summary.rows_out, "errored": summary.rows_errored,
            "rows_per_s": round(summary.rows_per_s, 3), "wall_s": round(summary.elapsed_s, 1),
            "accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("f1_macro"),
            "ece": metrics.get("expected_calibration_error"),
            "prompt_tokens_mean": round(prompt_tokens(cfg, table), 1),
            "swapped": changed, "load_average": load.summary()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--embedder", default="minilm")
    parser.add_argument("--corpora", type=lambda v: v.split(","), default=["banking77", "sst2", "sms_spam"])
    parser.add_argument("--modes", type=lambda v: v.split(","), default=["choice", "score"])
    parser.add_argument("--selects", type=lambda v: v.split(","), default=list(SELECTS))
    parser.add_argument("--wordings", type=lambda v: v.split(","), default=["as-shipped"],
                        help=f"SMS spam's label wording: {', '.join(WORDINGS)}")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=4096,
                        help="Banking77's 77 label names and 8 shots take ~1,000 prompt tokens")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prompted_shots.json")
    args = parser.parse_args()
    env = environment()
    model, embedder = model_folder(args.model), model_folder(args.embedder)
    if not start_real_data_ray():
        return 2
    work = Path(tempfile.mkdtemp(prefix="prompted-shots-"))
    results: dict = {}
    try:
        for corpus in args.corpora:
            table, pool = rows_and_pool(corpus, args.rows)
            pool_path = work / f"{corpus}-pool.parquet"
            pq.write_table(pool, pool_path)
            labels = sorted(set(pool.column("label").to_pylist()))
            if "similar" in args.selects:
                results[f"{corpus}/no-llm"] = {**neighbour_vote(table, pool, embedder, args.k),
                                               "tfidf_svm": tfidf_floor(table, pool)}
                print(json.dumps({f"{corpus}/no-llm": results[f"{corpus}/no-llm"]}), flush=True)
            wordings = args.wordings if corpus == "sms_spam" else ["as-shipped"]
            for mode, select, wording in itertools.product(args.modes, args.selects, wordings):
                key = f"{corpus}/{mode}/{select}" + ("" if wording == "as-shipped" else f"/{wording}")
                results[key] = run_one(mode, corpus, select, wording, table, pool_path, labels,
                                       model, embedder, work, args)
                print(json.dumps({key: results[key]}), flush=True)
                write_report({"environment": env, "model": args.model, "results": results},
                             args.out, "")  # partial results survive a run cut short
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = [[key, r["rows"], r["errored"], f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}",
              None if r["ece"] is None else f"{r['ece']:.3f}", r["prompt_tokens_mean"],
              r["rows_per_s"], r["load_average"]["mean"]] for key, r in results.items()
             if "vote_accuracy" not in r]
    table += [[f"{key} (vote / nearest / gold among the shots)", r["rows"], None,
               f"{r['vote_accuracy']:.4f} / {r['nearest_accuracy']:.4f} / {r['gold_among_shots']:.4f}",
               None, None, None, None, None] for key, r in results.items() if "vote_accuracy" in r]
    write_report({"environment": env, "model": args.model, "embedder": args.embedder,
                  "args": {k: v for k, v in vars(args).items() if k != "out"}, "results": results},
                 args.out, "\n".join([
                     markdown_table(["corpus/mode/shots", "rows", "errored", "accuracy", "macro-F1",
                                     "ECE", "prompt tokens", "rows/s", "load"], table),
                     f"\n{args.model}, k {args.k}, embedder {args.embedder}; {environment_line(env)}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
