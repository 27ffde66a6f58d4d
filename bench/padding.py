"""Padding the `hf` back end computes, on real length distributions: the share of the tokens
run through the model that are padding, as the actor batches rows today and as it could.

    .venv/bin/python bench/padding.py [--tokenizers minilm,qwen2.5-coder-0.5b-instruct]
        [--out bench/results/padding.json]

For each corpus (rows in file order, as a user's shards hold them) and tokenizer (real ones,
from `make models`), every row is tokenised as the actor does (max_length 512, cut rows
flagged), then batched five ways:
  chunk-32       sorted by length within each 1,024-row chunk (output.rows_per_part), 32 rows
                 a forward pass: the CPU default (output.parts_per_call 1)
  chunk-128      the same at 128 rows (the GPU micro-batch) with one part a call
  window-2x128   sorted within two chunks at once (the calls in flight, calls_per_actor 2)
  parts4-32      4 chunks a call (output.parts_per_call 4) at 32 rows
  part8k-128     8 chunks a call at 128 rows: the GPU default (output.parts_per_call 8); the
                 same batches as chunks of 8,192 rows (output.rows_per_part 8192)
  global-128     sorted over the whole corpus: the floor no chunked reader can beat
  chunk-128-b8   chunk-128 with every batch padded to a multiple of 8 tokens (length
  chunk-128-b16  buckets: the shapes a GPU sees), and 16; and how many distinct shapes each makes
Corpora: SST-2 (all splits), Banking77, GoEmotions, and a long-text corpus: 4,096 rows of 8 to
40 SST-2 sentences drawn at random (seeded), which the 512-token cap cuts about half of.
Pure tokenisation: no model runs, so the numbers do not depend on the machine's load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from common import DATA, REPO, environment, environment_line, markdown_table, model_folder, write_report

CHUNK = 1024
MAX_LENGTH = 512
SEED = 0
LONG_ROWS = 4096


def corpora() -> dict[str, list[str]]:
    texts = {name: pq.read_table(DATA / f"{name}.parquet", columns=["text"]).column("text").to_pylist()
             for name in ("sst2", "banking77", "goemotions")}
    rng, sentences = np.random.default_rng(SEED), texts["sst2"]
    texts["sst2-joined"] = [" ".join(sentences[i] for i in rng.choice(len(sentences), int(n)))
                            for n in rng.integers(8, 41, size=LONG_ROWS)]
    return texts


def batches_of(lengths: list[int], window: int, micro_batch: int) -> list[list[int]]:
    """Each `window`-row slice sorted by length and cut into micro-batches (hf's rule)."""
    from clsjob.backends.hf import length_sorted_batches

    out = []
    for start in range(0, len(lengths), window):
        part = lengths[start:start + window]
        out += [[part[i] for i in b] for b in length_sorted_batches(part, micro_batch)]
    return out


def measure(lengths: list[int], window: int, micro_batch: int, multiple: int = 1) -> dict:
    batches = batches_of(lengths, window, micro_batch)
    shapes = [(len(b), -(-max(b) // multiple) * multiple) for b in batches]
    computed = sum(rows * tokens for rows, tokens in shapes)
    real = sum(lengths)
    return {"computed_tokens": computed, "padding_share": round(1 - real / computed, 4),
            "distinct_token_counts": len({tokens for _, tokens in shapes}), "batches": len(batches)}


SCHEMES = {"chunk-32": (CHUNK, 32, 1), "chunk-128": (CHUNK, 128, 1),
           "window-2x128": (2 * CHUNK, 128, 1), "parts4-32": (4 * CHUNK, 32, 1),
           "part8k-128": (8 * CHUNK, 128, 1),
           "global-128": (None, 128, 1),
           "chunk-128-b8": (CHUNK, 128, 8), "chunk-128-b16": (CHUNK, 128, 16)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", type=lambda v: v.split(","),
                        default=["minilm", "qwen2.5-coder-0.5b-instruct"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "padding.json")
    args = parser.parse_args()
    if not DATA.exists():
        print(f"no data at {DATA}: this benchmark reads ../shared/data", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from clsjob.backends.hf import encode_truncating

    env, texts, results, table = environment(), corpora(), {}, []
    for name in args.tokenizers:
        tokenizer = AutoTokenizer.from_pretrained(model_folder(name))
        for corpus, rows in texts.items():
            ids, cut = encode_truncating(tokenizer, rows, MAX_LENGTH)
            lengths = [len(r) for r in ids]
            entry = {"rows": len(rows), "mean_tokens": round(float(np.mean(lengths)), 1),
                     "max_tokens": max(lengths), "rows_cut": int(sum(cut)),
                     **{scheme: measure(lengths, window or len(lengths), micro_batch, multiple)
                        for scheme, (window, micro_batch, multiple) in SCHEMES.items()}}
            results[f"{name}/{corpus}"] = entry
            table.append([name, corpus, entry["rows"], entry["mean_tokens"], entry["rows_cut"],
                          *(f"{entry[s]['padding_share']:.1%}" for s in SCHEMES),
                          f"{entry['chunk-128']['distinct_token_counts']} → "
                          f"{entry['chunk-128-b8']['distinct_token_counts']} / "
                          f"{entry['chunk-128-b16']['distinct_token_counts']}"])
    write_report({"environment": env, "chunk_rows": CHUNK, "max_length": MAX_LENGTH,
                  "schemes": {k: {"window": w, "micro_batch": m, "multiple": x}
                              for k, (w, m, x) in SCHEMES.items()}, "results": results},
                 args.out, "\n".join([markdown_table(
                     ["tokenizer", "corpus", "rows", "mean tokens", "rows cut", *SCHEMES,
                      "distinct shapes, chunk-128 → b8 / b16"], table), "", environment_line(env)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
