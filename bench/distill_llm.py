"""LLM distillation (issue 28): BigQuery AI.CLASSIFY's cost-minimising flow — an LLM labels a
sample, a small model is trained on its labels and gated, the LLM takes the rows the small one
is unsure of — on one's own cluster, through `clsjob distill` with a real instruct LLM.

- teacher: Qwen2.5-Coder-0.5B-Instruct through `vllm_prompt`, `score` mode with 8 fixed shots
  from SST-2 train: the best prompted setting on SST-2 dev (bench/prompted_shots.py: 0.880 on
  its first 200 rows), the same 8 shots — another 8 (the first of train in file order) gave
  0.770 on those rows, so which 8 matters;
- student: all-MiniLM-L6-v2 fine-tuned in full on the teacher's labels of the sample;
- corpus: SST-2 train + dev + test (9,613 rows) in 8 shards; its gold labels ride along as
  `input.label_column` — distill scores against them, never trains on them.

Per sample size (--samples 1000,3000), one run folder, run twice:
 1. `label_corpus: false`, the teacher and the student each one actor of 2 CPUs (every core):
    sample, teacher, split, student, gate. The teacher step's wall time is the teacher alone's
    speed end to end (engine start included), measured on that slice of the corpus;
 2. `label_corpus: true` with no resources (they may change between reruns): the job sizes
    the cascade's stages for the node (one CPU each on 2 cores); its wall time over the
    corpus is the cascade's speed end to end.
Then the student alone over the corpus (one actor of 2 CPUs).

Accuracy against gold: the teacher on the rows it labelled in the samples (random rows of the
corpus), the student alone and the cascade on the whole corpus, and all three side by side on
the sample rows the config's student did not train on. The teacher labelling everything is
extrapolated from its sample steps (wall = start + rows / rate, fitted on the slices). The
any-threshold curve on those rows: share escalated, accuracy, and the speed the measured
rates imply, 1 / (1 / r + escalated) times the teacher's (r: student over teacher rows/s).

    .venv/bin/python bench/distill_llm.py [--samples 1000,3000] [--cascade-agreement 0.95]
        [--min-agreement 0.8] [--work DIR] [--corpus-rows N] [--out FILE.json]

`--work DIR` keeps the run folders (a rerun resumes them); `--corpus-rows N` labels only the
first N corpus rows (a smoke run). Models from `make models`. CPU (2 cores): ~1 h 15 min.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import (DATA, REPO, TARGETS, LoadWatch, environment, environment_line,
                    markdown_table, model_folder, read_output, start_real_data_ray, write_report,
                    write_shards)
from cascade import threshold_curve
from prompted_shots import rows_and_pool, with_shots
from real_prompted import classify_config

LABELS = ["negative", "positive"]
SHARDS, SHOTS = 8, 8
TARGET = TARGETS["distill_llm"]


def write_corpus(work: Path, rows: int | None) -> tuple[Path, Path]:
    """(the corpus in SHARDS shards with a row-number id, the shots' pool: SST-2 train in
    bench/prompted_shots.py's seeded shuffle, whose first 8 rows are the fixed shots)."""
    table = pq.read_table(DATA / "sst2.parquet", columns=["text", "label", "split"])
    pool = work / "pool.parquet"
    pq.write_table(rows_and_pool("sst2", 1)[1], pool)
    table = table.slice(0, rows or table.num_rows)
    table = pa.table({"id": [f"{i:05d}" for i in range(table.num_rows)],
                      "text": table.column("text"), "gold": table.column("label")})
    return write_shards(table, work / "corpus", SHARDS), pool


def teacher_backend(work: Path, pool: Path) -> dict:
    """The shipped score config's back end with SST-2's wording and 8 fixed shots."""
    cfg, _ = classify_config("score", "sst2", LABELS, model_folder("qwen2.5-coder-0.5b-instruct"),
                             work, work, 2048)
    return with_shots(cfg, "fixed", pool, SHOTS, model_folder("minilm"))["backend"]


def distill_config(corpus: Path, teacher: dict, rows: int, gate: dict, run: Path,
                   label_corpus: bool) -> dict:
    from clsjob.demo import extract_minilm

    every_core = {} if label_corpus else {"resources": {"cpus_per_actor": 2}}
    return {
        "input": {"path": str(corpus), "id_column": "id", "label_column": "gold"},
        "labels": LABELS,
        "teacher": {"backend": teacher, **every_core},
        "student": {"base_model": str(extract_minilm(run.parent / "minilm")),
                    "training": {"method": "full", "epochs": 5, "learning_rate": 5e-5, "batch_size": 32,
                                 "max_length": 64, "gradient_checkpointing": False, "cpus_per_worker": 2},
                    **every_core},
        "sample": {"rows": rows, "seed": 0, "heldout_fraction": 0.2},
        "gate": gate,
        "label_corpus": label_corpus, "output": {"path": str(run)}}


def kept_walls(run: Path, *summaries: dict) -> dict:
    """Each step's wall time, kept beside the run folder: a resumed run's summary says only
    "done before" for the steps an earlier run timed."""
    record = run.parent / f"{run.name}-steps.json"
    walls = json.loads(record.read_text()) if record.exists() else {}
    for summary in summaries:
        walls |= {k: v for k, v in summary["steps_wall_s"].items() if isinstance(v, float)}
    record.write_text(json.dumps(walls))
    return walls


def student_alone(run: Path, corpus: Path, out: Path) -> tuple[dict, float]:
    from clsjob.config import ClassifyConfig, validate
    from clsjob.run.pipeline import run_classify

    started = time.monotonic()
    run_classify(validate({"input": {"path": str(corpus), "id_column": "id", "label_column": "gold"},
                           "backend": {"model": str(run / "student-model"), "max_length": 64},
                           "resources": {"cpus_per_actor": 2},
                           "output": {"path": str(out), "rows_per_part": 1024, "overwrite": True}},
                          model=ClassifyConfig))
    return json.loads((out / "_metrics.json").read_text()), time.monotonic() - started


def by_id(folder: Path, columns: list[str]) -> dict[str, dict]:
    return {r["id"]: r for r in read_output(folder, ["id", *columns]).to_pylist()}


def compare(rows: list[str], gold: dict, teacher: dict, student: dict, cascade: dict,
            speedup: float) -> dict:
    """The three side by side on `rows`, and every threshold's cascade on them."""
    g = np.array([gold[i] for i in rows])
    big = np.array([teacher[i]["label"] for i in rows])
    said = np.array([student[i]["label"] for i in rows])
    sure = np.nan_to_num(np.array([student[i]["confidence"] for i in rows], dtype=np.float64))
    teacher_accuracy = float((big == g).mean())
    curve = threshold_curve(g, said, sure, big, speedup)
    within = [c for c in curve if c["points_below_teacher"] <= TARGET["points_below_teacher"]]
    return {"rows": len(rows), "teacher": round(teacher_accuracy, 4),
            "student": round(float((said == g).mean()), 4),
            "cascade": round(float(np.mean([cascade[i]["label"] == gold[i] for i in rows])), 4),
            "agreement_student_teacher": round(float((said == big).mean()), 4),
            "fastest_within_target_points": max(within, key=lambda c: c["speed_vs_teacher"]) if within else None,
            "curve": curve}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=lambda v: [int(x) for x in v.split(",")], default=[1000, 3000])
    parser.add_argument("--cascade-agreement", type=float, default=0.95,
                        help="gate.cascade_agreement: the cascade's agreement with the teacher on "
                             "the held-out rows that picks the threshold")
    parser.add_argument("--min-agreement", type=float, default=0.8, help="gate.min_agreement")
    parser.add_argument("--work", type=Path, help="keep (and resume) the run folders here")
    parser.add_argument("--corpus-rows", type=int, help="label only the first N rows (a smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "distill_llm.json")
    args = parser.parse_args()
    from clsjob.config import DistillConfig, validate
    from clsjob.distill import run_distill

    env = environment()
    if not start_real_data_ray():
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus, pool = write_corpus(work, args.corpus_rows)
        teacher = teacher_backend(work, pool)
        gold = {r["id"]: r["gold"] for r in pq.read_table(corpus).select(["id", "gold"]).to_pylist()}
        gate = {"min_agreement": args.min_agreement, "cascade_agreement": args.cascade_agreement}
        runs, load = {}, {}
        for rows in args.samples:
            run = work / f"distill-{rows}"
            with LoadWatch() as load[rows]:
                gated = run_distill(validate(distill_config(corpus, teacher, rows, gate, run, False),
                                             model=DistillConfig))
                labelled = run_distill(validate(distill_config(corpus, teacher, rows, gate, run, True),
                                                model=DistillConfig))
                alone, alone_wall = student_alone(run, corpus, work / f"student-alone-{rows}")
            cascade = json.loads((run / "labelled" / "_metrics.json").read_text())
            runs[rows] = {"run": run, "steps_wall_s": kept_walls(run, gated, labelled),
                          "gate": labelled["gate"], "corpus": labelled["corpus"],
                          "cascade_accuracy": cascade["accuracy"],
                          "student_alone_accuracy": alone["accuracy"], "student_alone_wall_s": round(alone_wall, 1)}
        # The teacher's labels of every sampled row (score mode is deterministic: a row in
        # two samples got one label), and its speed on each slice.
        teacher_rows = {}
        for rows, r in runs.items():
            teacher_rows |= by_id(r["run"] / "teacher", ["label"])
        sampled = sorted(teacher_rows)
        teacher_accuracy = float(np.mean([teacher_rows[i]["label"] == gold[i] for i in sampled]))
        slices = {rows: (json.loads((r["run"] / "sample" / "_manifest.json").read_text())["rows"],
                         r["steps_wall_s"]["teacher"]) for rows, r in runs.items()}
        n, walls = np.array([v[0] for v in slices.values()]), np.array([v[1] for v in slices.values()])
        if len(n) > 1:  # wall = start + rows / rate
            per_row, start = np.polyfit(n, walls, 1)
        else:
            per_row, start = walls[0] / n[0], 0.0
        teacher_rate = float(n.sum() / walls.sum())
        everything_s = float(start + per_row * len(gold))
        results = {}
        for rows, r in runs.items():
            student = by_id(work / f"student-alone-{rows}", ["label", "confidence"])
            cascade = by_id(r["run"] / "labelled", ["label"])
            trained = set(pq.read_table(r["run"] / "student-data" / "train" / "part-0.parquet",
                                        columns=["id"]).column("id").to_pylist())
            student_rate = len(gold) / r["student_alone_wall_s"]
            cascade_rate = len(gold) / r["steps_wall_s"]["label_corpus"]
            results[rows] = {
                **{k: v for k, v in r.items() if k != "run"},
                "teacher_rows_per_s_on_sample": round(slices[rows][0] / slices[rows][1], 3),
                "student_alone_rows_per_s": round(student_rate, 1),
                "cascade_rows_per_s": round(cascade_rate, 2),
                "cascade_vs_teacher_speed": round(cascade_rate / teacher_rate, 2),
                "cascade_vs_teacher_everything_wall": round(everything_s / r["steps_wall_s"]["label_corpus"], 2),
                "cascade_points_below_teacher": round(100 * (teacher_accuracy - r["cascade_accuracy"]), 2),
                "met": bool(100 * (teacher_accuracy - r["cascade_accuracy"]) <= TARGET["points_below_teacher"]
                            and cascade_rate / teacher_rate >= TARGET["speed_vs_teacher"]),
                "on_sample_rows_not_trained_on": compare(
                    [i for i in sampled if i not in trained], gold, teacher_rows, student, cascade,
                    student_rate / teacher_rate)}
    result = {"corpus_rows": len(gold), "gate": gate,
              "teacher": {"sampled_rows": len(sampled), "accuracy": round(teacher_accuracy, 4),
                          "slices_rows_wall_s": {str(k): v for k, v in slices.items()},
                          "rows_per_s": round(teacher_rate, 3), "start_s": round(float(start), 1),
                          "everything_wall_s_extrapolated": round(everything_s, 1)},
              "samples": {str(k): v for k, v in results.items()},
              "load": {str(k): w.summary() for k, w in load.items()}}
    table = markdown_table(
        ["sample", "teacher share", "student alone", "cascade", "teacher (sampled rows)",
         "cascade rows/s", "x teacher", "steps wall s"],
        [[rows, round(r["corpus"]["teacher_share"], 4), round(r["student_alone_accuracy"], 4), round(r["cascade_accuracy"], 4),
          round(teacher_accuracy, 4), r["cascade_rows_per_s"], r["cascade_vs_teacher_speed"], r["steps_wall_s"]]
         for rows, r in results.items()])
    write_report({"environment": env, "target": TARGET, **result}, args.out,
                 f"{environment_line(env)}\n{table}\n" + json.dumps(result["teacher"], default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
