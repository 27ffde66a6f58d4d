"""Does the engine wait? The `vllm_prompt` actor fed one chunk at a time against two at once,
beside plain vLLM (the floor) and `ray.data.llm` (the peer).

    .venv/bin/python bench/feeding.py [--rows N] [--runs R] [--rows-per-part P] [--out FILE.json]

`resources.calls_per_actor: 1` is the actor as it was before: read, tokenise, then
`LLM.generate` on the chunk alone, whose batch drains at the chunk's tail. With 2 (the default)
the next chunk is read and tokenised while the engine works, and its rows join the engine's
batch before the last chunk's answers are done (backends/vllm_engine.EngineFeed).

Each run, in this order: the floor (`LLM.generate` of all the actor's own prompts in one call,
on a warm engine); ours through Ray Data (`run_classify`, 1 actor) with 1 and with 2 calls per
actor; the peer; then ours and the peer again on the first 64 rows alone. Steady state = the
full run less the 64-row run: what both pay once (processes, imports, engine start) drops out.
The model's busy share = the model's seconds (the manifest's `busy.model_s`) over the actor's
seconds, taken the same way. Same model, rows, prompts and constraint as bench/prompted.py.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import (REPO, environment, environment_line, make_actor, markdown_table, read_output,
                    write_report)
from prompted import (LABELS, STARTUP_ROWS, actor_prompts, bench_peer, build_model, load_sst2,
                      prompt_config, row_shards, warmup_texts)

CALLS = (1, 2)


def config(model: Path, shards: Path, out: Path, rows_per_part: int, calls: int, mode: str):
    cfg = prompt_config(model, LABELS, mode, input_path=str(shards), output_path=str(out))
    return cfg.model_copy(update={
        "output": cfg.output.model_copy(update={"rows_per_part": rows_per_part}),
        "resources": cfg.resources.model_copy(update={"calls_per_actor": calls})})


def floor(actor, prompts: list[list[int]], warm: list[list[int]]) -> tuple[float, list[str]]:
    """(seconds, answers) of one `LLM.generate` over every prompt, on the actor's own engine
    (its feed thread is idle: nothing else touches the engine meanwhile). The prefix cache is
    emptied first, or a second run would find every prompt cached by the first, then warmed
    with rows that are not measured: the shared prompt head is cached, as in any steady state."""
    from vllm.inputs import TokensPrompt

    def generate(ids: list[list[int]]) -> list:
        return actor.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids],
                                  actor.mode.params.clone(), use_tqdm=False)

    assert actor.llm.reset_prefix_cache()
    generate(warm)
    start = time.perf_counter()
    outputs = generate(prompts)
    seconds = time.perf_counter() - start
    return seconds, [actor.mode.parse(o.outputs[0].text, o.outputs[0].finish_reason)[0] for o in outputs]


def ours(model: Path, shards: Path, out: Path, rows_per_part: int, calls: int, mode: str) -> dict:
    from clsjob.run.pipeline import run_classify

    start = time.perf_counter()
    summary = run_classify(config(model, shards, out, rows_per_part, calls, mode))
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "_manifest.json").read_text())
    table = read_output(out)
    assert summary.rows_out == summary.rows_in == table.num_rows
    order = table.column("row").to_numpy().argsort()
    return {"seconds": seconds, "busy_s": manifest["busy"]["model_s"], "elapsed_s": manifest["elapsed_s"],
            "labels": [table.column("label").to_pylist()[i] for i in order]}


def steady(full: dict, small: dict, rows: int) -> dict:
    """Rows/s and busy share of the rows the full run has beyond the small one."""
    seconds = full["seconds"] - small["seconds"]
    out = {"rows_per_s": (rows - STARTUP_ROWS) / seconds}
    if "busy_s" in full:
        out["busy_share"] = (full["busy_s"] - small["busy_s"]) / seconds
        out["busy_share_end_to_end"] = full["busy_s"] / full["seconds"]
    return out


def summarise(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": [round(v, 3) for v in values]}


def assemble(runs: list[dict]) -> dict:
    def series(key: str, field: str = "rows_per_s") -> list[float]:
        return [r[key][field] for r in runs]

    peer = "peer" in runs[0]
    rows = {"floor": series("floor"), **({"peer": series("peer")} if peer else {})}
    for calls in CALLS:
        rows[f"ours_{calls}"] = series(f"ours_{calls}")
        rows[f"ours_{calls}_busy_share"] = series(f"ours_{calls}", "busy_share")
        rows[f"ours_{calls}_busy_share_end_to_end"] = series(f"ours_{calls}", "busy_share_end_to_end")
        rows[f"ours_{calls}_vs_floor"] = [r[f"ours_{calls}"]["rows_per_s"] / r["floor"]["rows_per_s"] for r in runs]
        if peer:
            rows[f"ours_{calls}_vs_peer"] = [r[f"ours_{calls}"]["rows_per_s"] / r["peer"]["rows_per_s"] for r in runs]
    rows["ours_2_vs_ours_1"] = [r["ours_2"]["rows_per_s"] / r["ours_1"]["rows_per_s"] for r in runs]
    return {name: summarise(values) for name, values in rows.items()}


def markdown(report: dict) -> str:
    s = report["summary"]

    def cell(name: str, digits: int = 2) -> str:
        v = s.get(name)
        if v is None:
            return "—"
        return f"{v['median']:.{digits}f} ({v['min']:.{digits}f}–{v['max']:.{digits}f})"

    table = [["floor: one `LLM.generate`, warm engine", cell("floor"), "", "", "", ""],
             ["peer: `ray.data.llm`", cell("peer"), "", "", "", ""]]
    for calls in CALLS:
        table.append([f"ours, calls_per_actor {calls}", cell(f"ours_{calls}"),
                      cell(f"ours_{calls}_busy_share"), cell(f"ours_{calls}_busy_share_end_to_end"),
                      cell(f"ours_{calls}_vs_floor"), cell(f"ours_{calls}_vs_peer")])
    lines = [markdown_table(["steady state", "rows/s", "model busy share", "busy share, end to end",
                             "x floor", "x peer"], table), "",
             f"- ours with 2 calls / ours with 1: {cell('ours_2_vs_ours_1')}",
             f"- labels: {report['agreement']}",
             f"- median (min–max) of {report['settings']['runs']} runs; {report['settings']['mode']} mode, "
             f"{report['settings']['rows']} rows, {report['settings']['rows_per_part']} per part",
             "- " + environment_line(report["environment"])]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="SST-2 dev+test rows to label")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows-per-part", type=int, default=128,
                        help="chunk size: each chunk's tail is where a one-at-a-time actor drains")
    parser.add_argument("--mode", choices=["choice", "json"], default="choice",
                        help="json: answers of many tokens, finishing at different steps (no peer)")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/feeding-<mode>.json")
    args = parser.parse_args()
    args.out = args.out or REPO / "bench" / "results" / f"feeding-{args.mode}.json"
    if args.rows <= STARTUP_ROWS:
        parser.error(f"--rows must be above {STARTUP_ROWS}, the rows of the start-up run")
    return args


def main() -> None:
    args = parse_args()
    from clsjob.backends.vllm_engine import prepare_env

    prepare_env(use_gpu=False)  # before vLLM or Ray load: an in-process engine everywhere
    rows, train = load_sst2(args.rows)
    env = environment()
    work = Path(tempfile.mkdtemp(prefix="bench-feeding-"))
    log = lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    model = build_model(work / "model", train.column("text").to_pylist())
    shards, few = row_shards(rows, work / "input"), row_shards(rows.slice(0, STARTUP_ROWS), work / "few")

    # The floor replays the actor's own token ids and sampling parameters on its engine.
    actor = make_actor(prompt_config(model, LABELS, args.mode))
    prompts = actor_prompts(actor, rows.column("text").to_pylist())
    warm = actor_prompts(actor, warmup_texts(train))
    max_tokens = actor.mode.params.max_tokens

    import ray

    ray.init(num_cpus=4, include_dashboard=False)  # reader and writer slots beside the actor
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs, labels = [], {}
    try:
        for run in range(args.runs):
            seconds, floor_labels = floor(actor, prompts, warm)
            result = {"floor": {"rows_per_s": len(prompts) / seconds}}
            log(f"run {run + 1}: floor {len(prompts) / seconds:.1f} rows/s")
            full, small = {}, {}
            for calls in CALLS:
                full[calls] = ours(model, shards, work / f"out-{calls}", args.rows_per_part, calls, args.mode)
                log(f"run {run + 1}: ours, {calls} call(s): {rows.num_rows / full[calls]['seconds']:.1f} rows/s end to end")
            # The peer is set up for choice (the constraint bench/prompted.py gives it).
            peer_full = bench_peer(model, shards, rows.num_rows, max_tokens, log) if args.mode == "choice" else None
            for calls in CALLS:
                small[calls] = ours(model, few, work / f"few-{calls}", args.rows_per_part, calls, args.mode)
                result[f"ours_{calls}"] = steady(full[calls], small[calls], rows.num_rows)
                labels[f"ours_{calls}"] = full[calls]["labels"]
            if peer_full:
                peer_small = bench_peer(model, few, STARTUP_ROWS, max_tokens, log, "peer, 64 rows")
                result["peer"] = steady(peer_full["result"], peer_small["result"], rows.num_rows)
                labels["peer"] = peer_full["labels"]
            log(f"run {run + 1}: steady " + ", ".join(f"{k} {v['rows_per_s']:.1f}" for k, v in result.items()))
            runs.append(result)
    finally:
        ray.shutdown()
    agreement = {name: round(sum(a == b for a, b in zip(got, floor_labels)) / len(got), 4)
                 for name, got in labels.items()}
    report = {"environment": env, "settings": {"rows": rows.num_rows, "runs": args.runs, "mode": args.mode,
                                               "rows_per_part": args.rows_per_part,
                                               "startup_rows": STARTUP_ROWS},
              "summary": assemble(runs), "runs": runs, "agreement": {"same label as the floor": agreement}}
    write_report(report, args.out, markdown(report))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
