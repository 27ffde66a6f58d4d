"""What `task: multi_label` costs a prompted LLM: `score` mode (one yes/no question per label
after the row's shared prompt, read from vLLM's prefix cache) against `json` mode (one
generated `{labels, reasoning}` answer), and score with the prefix cache off, on GoEmotions
test rows with its 28 labels and with 6 of them.

    .venv/bin/python bench/prompted_multilabel.py [--rows N] [--runs R] [--out FILE.json]

The actor class is called in-process on prepared chunks (bench/prompted.py's part a), after a
warm-up call, on the random ~30 M-parameter Qwen2 bench/prompted.py builds (the forward pass,
not Python, dominates on CPU; its answers are meaningless). Each variant runs R times, in
turn; rows/s is reported as the median with the spread.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import (DATA, REPO, environment, environment_line, make_actor, markdown_table,
                    prepared_chunks, write_report)
from prompted import build_model, free_engines

SIX = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]  # Ekman's six
BATCH = 256


def config(model: Path, labels: list[str], mode: str, prefix_caching: bool = True):
    from clsjob.config import ClassifyConfig, validate

    return validate({"task": "multi_label", "input": {"path": "unused"}, "labels": labels,
                     "backend": {"kind": "vllm_prompt", "model": str(model), "max_length": 128,
                                 "prompt": {"mode": mode, "reasoning_max_chars": 60},
                                 "engine": {"max_model_len": 2048,
                                            "enable_prefix_caching": prefix_caching}},
                     "output": {"path": "unused"}}, model=ClassifyConfig)


def answer_tokens(actor, out: pa.Table) -> float:
    answers = [json.dumps({"labels": labels, "reasoning": why})
               for labels, why, error in zip(*(out.column(c).to_pylist()
                                               for c in ("labels", "reasoning", "error")))
               if error is None]
    return round(statistics.mean(len(actor.tokenizer.encode(a, add_special_tokens=False))
                                 for a in answers), 1) if answers else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "prompted_multilabel.json"))
    args = parser.parse_args()
    from clsjob.backends.vllm_engine import prepare_env

    prepare_env(use_gpu=False)
    table = pq.read_table(DATA / "goemotions.parquet", columns=["text", "labels", "split"])
    train = table.filter(pc.equal(table.column("split"), "train"))
    test = table.filter(pc.equal(table.column("split"), "test")).slice(0, args.rows)
    everything = sorted({x for g in train.column("labels").to_pylist() for x in g})
    env = environment()
    log = lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="bench-prompted-ml-"))
    model = build_model(work / "model", train.column("text").to_pylist())
    rows = pa.table({"text": test.column("text")})
    chunks = prepared_chunks(rows, BATCH)
    warm = prepared_chunks(pa.table({"text": train.column("text").to_pylist()[-4:]}), 4)[0]

    # The prefix cache off only with 6 labels: with 28 it would take most of the run's time.
    variants = [(f"{mode}, {len(labels)} labels" + ("" if cache else ", prefix cache off"),
                 labels, mode, cache)
                for labels, modes in ((everything, (("json", True), ("score", True))),
                                      (SIX, (("json", True), ("score", True), ("score", False))))
                for mode, cache in modes]
    timings: dict[str, list[float]] = {name: [] for name, *_ in variants}
    notes: dict[str, dict] = {}
    for run in range(args.runs):
        for name, labels, mode, cache in variants:
            actor = make_actor(config(model, labels, mode, cache))
            actor(warm)  # grammar compile, kernels, the shared head in the cache
            start = time.perf_counter()
            out = pa.concat_tables([actor(c) for c in chunks])
            timings[name].append(time.perf_counter() - start)
            answered = [x for x, e in zip(out.column("labels").to_pylist(),
                                          out.column("error").to_pylist()) if e is None]
            notes[name] = {"errors": out.num_rows - len(answered),
                           "labels_a_row": round(sum(map(len, answered)) / max(len(answered), 1), 2),
                           "requests_a_row": len(labels) if mode == "score" else 1,
                           # json: what was generated (the answer re-tokenised): a random
                           # model's answers are short, a real model's reasoning is longer.
                           "answer_tokens_a_row": answer_tokens(actor, out) if mode == "json" else 1}
            log(f"run {run + 1} {name}: {rows.num_rows / timings[name][-1]:.1f} rows/s")
            del actor
            free_engines()

    results = []
    for name, labels, mode, cache in variants:
        per_s = sorted(rows.num_rows / s for s in timings[name])
        json_name = f"json, {len(labels)} labels"
        results.append({"variant": name, "rows": rows.num_rows, "runs": args.runs,
                        "rows_per_s_median": round(statistics.median(per_s), 2),
                        "rows_per_s_min": round(per_s[0], 2), "rows_per_s_max": round(per_s[-1], 2),
                        "vs_json": round(statistics.median(timings[json_name]) / statistics.median(timings[name]), 3),
                        **notes[name]})
    table_md = markdown_table(
        ["variant", "rows/s median (min–max)", "vs json", "requests a row", "tokens answered a row",
         "labels a row", "errors"],
        [[r["variant"], f"{r['rows_per_s_median']} ({r['rows_per_s_min']}–{r['rows_per_s_max']})",
          r["vs_json"], r["requests_a_row"], r["answer_tokens_a_row"], r["labels_a_row"],
          r["errors"]] for r in results])
    write_report({"environment": env, "settings": {"rows": rows.num_rows, "runs": args.runs,
                                                   "batch": BATCH, "reasoning_max_chars": 60},
                  "results": results}, Path(args.out), f"\n{table_md}\n\n{environment_line(env)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
