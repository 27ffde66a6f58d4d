"""The classifier cascade with a teacher worth escalating to (issue 28): all-MiniLM-L6-v2 as
the student and all-mpnet-base-v2 (about 5x its cost a row) as the teacher, both fine-tuned
in full through clsjob on the corpus's train split, then `backend.kind: cascade` end to end
through Ray Data against the teacher alone.

    .venv/bin/python bench/cascade.py [--corpus sst2|banking77] [--work DIR] [--runs 3]
        [--copies 4] [--margin 0.25] [--pick fastest|most-accurate] [--student-epochs N]
        [--teacher-epochs N]
        [--train-rows N] [--eval-rows N] [--out FILE.json]

Two scored halves, A and B: SST-2 dev and test; Banking77 test (it has no dev split) cut in
two in a seeded shuffle. The threshold is picked on A, from the student's and the teacher's
labels of A: the lowest (in steps of 0.005) whose cascade — the student's label where its
confidence is at least the threshold, the teacher's under it — is within --margin points
of the teacher alone on A (half the target's 0.5, so the split's noise has room); or, with
`--pick most-accurate`, the one whose cascade is most accurate on A (the lowest of equals) —
for models of equal accuracy whose errors differ, where a cascade can beat both. The
cascade with that threshold then runs on B; and the reverse (picked on B, run on A).

Speed: B --copies times over, `--runs` alternating runs of the teacher alone, the student
alone (one actor of 2 CPUs each: 2 torch threads on the 2 cores) and the cascade, whose
stages set no resources so the job sizes them (one CPU each on 2 cores); rows/s end to end,
start-up included. Beside them, what any threshold reaches on B (`any_threshold`: share
escalated, accuracy, and the speed the measured student and teacher speeds imply).

`--work DIR` keeps the fine-tuned models and reuses them. `--train-rows N` and
`--eval-rows N` train on, and score, the first N rows only (a smoke run). Models from `make models`. CPU: about 1 h for SST-2
(the teacher's fine-tune and its speed runs are most of it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import (DATA, REPO, TARGETS, environment, environment_line, markdown_table, model_folder,
                    read_output, start_real_data_ray, write_report)
from finetune_accuracy import MPNET_TASKS, TASKS, finetune_minilm

SEED = 0
STEP = 0.005


def halves(corpus: str, work: Path, rows: int | None = None) -> tuple[Path, Path]:
    """The two scored halves as shard folders (A, B); `rows`: the first of each only."""
    table = pq.read_table(DATA / f"{corpus}.parquet", columns=["text", "label", "split"])
    if corpus == "sst2":
        parts = [table.filter(pc.equal(table.column("split"), s)) for s in ("dev", "test")]
    else:
        test = table.filter(pc.equal(table.column("split"), "test"))
        test = test.take(np.random.default_rng(SEED).permutation(test.num_rows))
        parts = [test.slice(0, test.num_rows // 2), test.slice(test.num_rows // 2)]
    folders = []
    for name, part in zip("AB", parts):
        folder = work / f"half-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(part.select(["text", "label"]).slice(0, rows or part.num_rows),
                       folder / "part-0.parquet")
        folders.append(folder)
    return folders[0], folders[1]


def train(corpus: str, work: Path, which: str, eval_half: Path, epochs: int | None,
          train_rows: int | None) -> dict:
    """The student (MiniLM) or the teacher (mpnet) fine-tuned on train, its eval rows half A
    (which also fits its temperature); kept in work/<which>/model and reused."""
    folder = work / which
    if (folder / "model" / "config.json").exists():
        return {"wall_time_s": "reused"}
    table = pq.read_table(DATA / f"{corpus}.parquet", columns=["text", "label", "split"])
    rows = table.filter(pc.equal(table.column("split"), "train")).select(["text", "label"])
    (folder / "train").mkdir(parents=True, exist_ok=True)
    pq.write_table(rows.slice(0, train_rows or rows.num_rows), folder / "train" / "part-0.parquet")
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    pq.write_table(pq.read_table(eval_half / "part-0.parquet"), folder / "eval" / "part-0.parquet")
    task = dict((TASKS if which == "student" else MPNET_TASKS)[corpus])
    task["epochs"] = epochs or task["epochs"]
    started = time.monotonic()
    trained = finetune_minilm(task, folder, base=None if which == "student" else model_folder("mpnet"))
    return {"epochs": task["epochs"], "learning_rate": task["learning_rate"],
            "train_rows": trained.get("train_rows"), "wall_time_s": round(time.monotonic() - started, 1),
            "eval_accuracy_per_epoch": [round(e["eval_accuracy"], 4) for e in trained["epochs"]]}


def variants(work: Path, below: float) -> dict:
    student = {"model": str(work / "student" / "model"), "max_length": 64}
    teacher = {"model": str(work / "teacher" / "model"), "max_length": 64}
    alone = {"cpus_per_actor": 2}
    return {"teacher": {"backend": teacher, "resources": alone},
            "student": {"backend": student, "resources": alone},
            # No resources: the job sizes the stages for this CPU node (and logs how).
            "cascade": {"backend": {"kind": "cascade", "stages": [
                {"name": "student", "backend": student, "escalate_below": below},
                {"name": "teacher", "backend": teacher}]}}}


def classify(variant: dict, corpus: Path, out: Path) -> tuple[dict, dict, float]:
    """(manifest, metrics, wall seconds) of one classify run, start-up included."""
    from clsjob.config import ClassifyConfig, validate
    from clsjob.run.pipeline import run_classify

    started = time.monotonic()
    run_classify(validate({"input": {"path": str(corpus), "label_column": "label"}, **variant,
                           "output": {"path": str(out), "rows_per_part": 512, "overwrite": True}},
                          model=ClassifyConfig))
    wall = time.monotonic() - started
    return (json.loads((out / "_manifest.json").read_text()),
            json.loads((out / "_metrics.json").read_text()), wall)


def labels_of(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gold, label, confidence) of a run's rows, by id."""
    rows = read_output(out, ["id", "gold", "label", "confidence"]).sort_by("id")
    return (np.array(rows.column("gold").to_pylist()), np.array(rows.column("label").to_pylist()),
            np.nan_to_num(np.array(rows.column("confidence").to_pylist(), dtype=np.float64)))


def curve(student: Path, teacher: Path, speedup: float | None = None) -> list[dict]:
    """Every threshold of the student's and the teacher's runs of the same rows
    (threshold_curve)."""
    gold, said, sure = labels_of(student)
    gold_t, big, _ = labels_of(teacher)
    assert (gold == gold_t).all(), "the student's and the teacher's rows differ"
    return threshold_curve(gold, said, sure, big, speedup)


def threshold_curve(gold: np.ndarray, said: np.ndarray, sure: np.ndarray, big: np.ndarray,
                    speedup: float | None = None) -> list[dict]:
    """Every threshold 0.5..1.0 (and 0: the student alone) on rows whose gold, student label
    (`said`), student confidence (`sure`) and teacher label (`big`) are given: the share
    escalated, the cascade's accuracy and its gap to the teacher alone on these rows; with
    `speedup` (the student's rows/s over the teacher's), the cascade's speed against the
    teacher that the measured speeds imply: 1 / (1 / speedup + escalated)."""
    teacher_accuracy = float((big == gold).mean())
    out = []
    for below in [0.0, *np.round(np.arange(0.5, 1.0 + STEP / 2, STEP), 3)]:
        escalated = sure < below
        accuracy = float((np.where(escalated, big, said) == gold).mean())
        point = {"below": float(below), "escalated": round(float(escalated.mean()), 4),
                 "accuracy": round(accuracy, 4),
                 "points_below_teacher": round(100 * (teacher_accuracy - accuracy), 2)}
        if speedup:
            point["speed_vs_teacher"] = round(float(1 / (1 / speedup + escalated.mean())), 2)
        out.append(point)
    return out


def pick(points: list[dict], margin: float, rule: str = "fastest") -> dict:
    """The lowest threshold (0.5 at least: `escalate_below` is a confidence) whose cascade
    is within `margin` points of the teacher; `most-accurate`: the one whose cascade is most
    accurate (0.5 at least too; the lowest of equals)."""
    points = [p for p in points if p["below"] >= 0.5]
    if rule == "most-accurate":
        return max(points, key=lambda p: (p["accuracy"], -p["below"]))
    return next(p for p in points if p["points_below_teacher"] <= margin)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=["sst2", "banking77"], default="sst2")
    parser.add_argument("--work", type=Path, help="keep (and reuse) the models and runs here")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--copies", type=int, default=4, help="speed corpus: B this many times over")
    parser.add_argument("--margin", type=float, default=0.25,
                        help="points below the teacher on A the picked threshold may be")
    parser.add_argument("--pick", choices=["fastest", "most-accurate"], default="fastest",
                        help="fastest within --margin, or the most accurate on its half")
    parser.add_argument("--student-epochs", type=int)
    parser.add_argument("--teacher-epochs", type=int)
    parser.add_argument("--train-rows", type=int, help="train on the first N rows (a smoke run)")
    parser.add_argument("--eval-rows", type=int, help="score the first N rows of each half (a smoke run)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out_file = args.out or REPO / "bench" / "results" / f"cascade-{args.corpus}.json"
    env = environment()
    if not start_real_data_ray():
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        half_a, half_b = halves(args.corpus, work, args.eval_rows)
        trained = {which: train(args.corpus, work, which, half_a, epochs, args.train_rows)
                   for which, epochs in (("student", args.student_epochs), ("teacher", args.teacher_epochs))}
        # Each model alone on both halves, once: what the thresholds are picked from.
        alone = {}
        for half, folder in (("A", half_a), ("B", half_b)):
            for name in ("student", "teacher"):
                _, metrics, _ = classify(variants(work, 0.5)[name], folder, work / f"{name}-{half}")
                alone[f"{name}/{half}"] = {"accuracy": metrics["accuracy"], "f1_macro": metrics["f1_macro"]}
        # Picked on one half, the cascade run end to end on the other.
        scored = {}
        for picked_on, run_on, folder in (("A", "B", half_b), ("B", "A", half_a)):
            point = pick(curve(work / f"student-{picked_on}", work / f"teacher-{picked_on}"), args.margin,
                         args.pick)
            manifest, metrics, _ = classify(variants(work, point["below"])["cascade"], folder,
                                            work / f"cascade-{run_on}")
            scored[f"picked on {picked_on}, run on {run_on}"] = {
                "below": point["below"], "on_its_half": point,
                "accuracy": metrics["accuracy"], "f1_macro": metrics["f1_macro"],
                "teacher_accuracy": alone[f"teacher/{run_on}"]["accuracy"],
                "points_below_teacher": round(100 * (alone[f"teacher/{run_on}"]["accuracy"]
                                                     - metrics["accuracy"]), 2),
                "escalated_share": manifest["cascade"]["escalated_share"]}
        below = scored["picked on A, run on B"]["below"]
        speed_corpus = work / "speed"
        speed_corpus.mkdir(exist_ok=True)
        rows_b = pq.read_table(half_b / "part-0.parquet")
        pq.write_table(pa.concat_tables([rows_b] * args.copies), speed_corpus / "part-0.parquet")
        speed = {name: [] for name in ("teacher", "student", "cascade")}
        shares = []
        for _ in range(args.runs):
            for name in speed:
                manifest, _, wall = classify(variants(work, below)[name], speed_corpus, work / f"speed-{name}")
                speed[name].append(round(manifest["rows_out"] / wall, 2))
                if name == "cascade":
                    shares.append(manifest["cascade"]["escalated_share"])
        median = {name: statistics.median(runs) for name, runs in speed.items()}
        any_threshold = curve(work / "student-B", work / "teacher-B", median["student"] / median["teacher"])
    target = TARGETS["distill"]
    headline = scored["picked on A, run on B"]
    result = {
        "corpus": args.corpus, "halves": {"A": "dev" if args.corpus == "sst2" else "test, first half",
                                          "B": "test" if args.corpus == "sst2" else "test, second half"},
        "margin_points": args.margin, "pick": args.pick, "finetune": trained, "alone": alone, "cascade": scored,
        "speed_rows": rows_b.num_rows * args.copies, "speed_rows_per_s": speed,
        "speed_escalated_share": shares,
        "cascade_vs_teacher_speed": round(median["cascade"] / median["teacher"], 3),
        "cascade_vs_teacher_speed_range": [round(c / t, 3) for c, t in zip(speed["cascade"], speed["teacher"])],
        "student_vs_teacher_speed": round(median["student"] / median["teacher"], 3),
    }
    result["met"] = (headline["points_below_teacher"] <= target["points_below_teacher"]
                     and result["cascade_vs_teacher_speed"] >= target["speed_vs_teacher"])
    within = [p for p in any_threshold if p["points_below_teacher"] <= target["points_below_teacher"]]
    result["any_threshold"] = {
        "fastest_within_target_points": max(within, key=lambda p: p["speed_vs_teacher"]) if within else None,
        "curve": any_threshold}
    table = markdown_table(
        ["variant", "accuracy A", "accuracy B", "rows/s end to end (median)", "runs"],
        [[name, round(alone[f"{name}/A"]["accuracy"], 4), round(alone[f"{name}/B"]["accuracy"], 4),
          median[name], speed[name]] for name in ("teacher", "student")]
        + [["cascade (picked on A)", None, round(headline["accuracy"], 4), median["cascade"], speed["cascade"]]])
    write_report({"environment": env, "target": target, **result}, out_file,
                 f"{environment_line(env)}\n{table}\n" + json.dumps(
                     {k: result[k] for k in ("cascade", "cascade_vs_teacher_speed", "met")}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
