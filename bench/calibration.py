"""Calibrated confidence on real data: all-MiniLM-L6-v2 fine-tuned in full through clsjob on
90% of SST-2 train and of Banking77 train, its temperature fitted on the other 10% (the
finetune's eval rows), merged, and the scored split (SST-2 dev, Banking77 test) classified
twice through the Ray Data pipeline: with the folder's temperature (`backend.calibrated`,
the default) and without it. Same rows, same model; only the temperature differs.

    .venv/bin/python bench/calibration.py [--only sst2|banking77] [--out FILE.json]

Targets (TARGETS["calibration"]): on the scored split, ECE after calibration <= 0.03 or at most
half of before, and every row keeps its label (accuracy unchanged). CPU: ~30 min for both.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import (DATA, REPO, TARGETS, environment, environment_line, markdown_table, read_output,
                    start_real_data_ray, write_report)
from finetune_accuracy import TASKS, finetune_minilm

HELD_OUT = 0.1  # share of train kept out of training: the eval rows the temperature is fitted on


def write_splits(corpus: str, scored_split: str, work: Path) -> dict[str, int]:
    """train (90% of train), eval (the other 10%, seeded) and scored (`scored_split`)."""
    table = pq.read_table(DATA / f"{corpus}.parquet").select(["text", "label", "split"])
    train = table.filter(pc.equal(table.column("split"), "train")).drop_columns(["split"])
    order = np.random.default_rng(0).permutation(train.num_rows)
    cut = int(train.num_rows * HELD_OUT)
    parts = {"eval": train.take(order[:cut]), "train": train.take(order[cut:]),
             "scored": table.filter(pc.equal(table.column("split"), scored_split)).drop_columns(["split"])}
    for name, part in parts.items():
        (work / name).mkdir(parents=True)
        pq.write_table(part, work / name / "part-0.parquet")
    return {name: part.num_rows for name, part in parts.items()}


def classify(work: Path, out: str, calibrated: bool):
    from clsjob.config import ClassifyConfig, validate
    from clsjob.run.pipeline import run_classify

    summary = run_classify(validate({
        "input": {"path": str(work / "scored"), "label_column": "label"},
        # float32: the comparison is about the temperature alone, on any CPU
        "backend": {"model": str(work / "model"), "max_length": 64, "dtype": "float32",
                    "calibrated": calibrated},
        "resources": {"cpus_per_actor": 2},
        "output": {"path": str(work / out), "rows_per_part": 512},
    }, model=ClassifyConfig))
    labels = read_output(work / out)
    return summary.metrics, labels.sort_by("id").column("label").to_pylist()


def run_corpus(corpus: str, task: dict, work: Path) -> dict:
    rows = write_splits(corpus, task["eval"], work)
    started = time.monotonic()
    trained = finetune_minilm(task, work)
    raw, raw_labels = classify(work, "raw", calibrated=False)
    cal, cal_labels = classify(work, "calibrated", calibrated=True)
    target = TARGETS["calibration"]
    same = sum(a == b for a, b in zip(raw_labels, cal_labels)) / len(raw_labels)
    ece_before, ece_after = raw["expected_calibration_error"], cal["expected_calibration_error"]
    return {
        "corpus": corpus, "rows": rows, "scored_split": task["eval"],
        "fit": trained["calibration"],  # on the held-out eval rows
        "before": {k: raw[k] for k in ("accuracy", "expected_calibration_error", "negative_log_likelihood")},
        "after": {k: cal[k] for k in ("accuracy", "expected_calibration_error", "negative_log_likelihood")},
        "same_label": same, "target": target,
        "met": bool((ece_after <= target["ece_max"] or ece_after <= target["ece_ratio"] * ece_before)
                    and same == 1.0),
        "wall_time_s": round(time.monotonic() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(TASKS))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "calibration.json"))
    args = parser.parse_args()
    env = environment()
    if not start_real_data_ray():
        return 2

    results = []
    for corpus, task in TASKS.items():
        if args.only and corpus != args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run_corpus(corpus, task, Path(tmp)))
        print(json.dumps(results[-1], indent=2), flush=True)

    f = lambda x: f"{x:.4f}"  # noqa: E731
    table = markdown_table(
        ["corpus (scored split, rows)", "T (fit on eval rows)", "accuracy", "ECE before → after",
         "NLL before → after", "same label", "met"],
        [[f"{r['corpus']} ({r['scored_split']}, {r['rows']['scored']})",
          f"{r['fit']['temperature']:.3f} ({r['fit']['rows']})",
          f"{f(r['before']['accuracy'])} → {f(r['after']['accuracy'])}",
          f"{f(r['before']['expected_calibration_error'])} → {f(r['after']['expected_calibration_error'])}",
          f"{f(r['before']['negative_log_likelihood'])} → {f(r['after']['negative_log_likelihood'])}",
          f"{100 * r['same_label']:.2f}%", "yes" if r["met"] else "no"] for r in results])
    write_report({"environment": env, "results": results}, Path(args.out),
                 f"\n{table}\n\n{environment_line(env)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
