"""Abstention on an open-set test built from Banking77: all-MiniLM-L6-v2 fine-tuned in full
through clsjob on 60 of the 77 intents (90% of their train rows; the other 10% are the eval
rows the temperature and the abstention threshold are fitted on), then the whole test split
classified through the Ray Data pipeline, the 17 unseen intents' rows counting as
`out_of_scope`. Four runs on the same model: raw or calibrated confidence, with or without
abstention (the raw run's threshold picked on the eval rows' raw confidences by the same rule
`finetune` applies to the calibrated ones: at most 2 points of eval accuracy).

    .venv/bin/python bench/open_set.py [--out FILE.json]

Target (TARGETS["open_set"]): out-of-scope recall >= 0.7 with abstention, at most 2 points of
in-scope accuracy lost against the same confidences without it. CPU: ~20 min.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import (DATA, REPO, TARGETS, environment, environment_line, markdown_table, read_output,
                    start_real_data_ray, write_report)
from finetune_accuracy import TASKS, finetune_minilm

KNOWN = 60
OOS = "out_of_scope"


def write_splits(work: Path) -> dict:
    table = pq.read_table(DATA / "banking77.parquet").select(["text", "label", "split"])
    intents = sorted(set(table.column("label").to_pylist()))
    known = sorted(np.random.default_rng(0).permutation(intents)[:KNOWN].tolist())
    train = table.filter(pc.and_(pc.equal(table.column("split"), "train"),
                                 pc.is_in(table.column("label"), pa.array(known)))).drop_columns(["split"])
    order = np.random.default_rng(1).permutation(train.num_rows)
    cut = train.num_rows // 10
    test = table.filter(pc.equal(table.column("split"), "test")).drop_columns(["split"])
    gold = [g if g in known else OOS for g in test.column("label").to_pylist()]
    parts = {"eval": train.take(order[:cut]), "train": train.take(order[cut:]),
             "test": test.set_column(1, "label", pa.array(gold, pa.string()))}
    for name, part in parts.items():
        (work / name).mkdir(parents=True)
        pq.write_table(part, work / name / "part-0.parquet")
    return {"known_intents": len(known), "unseen_intents": len(intents) - len(known),
            **{f"{name}_rows": part.num_rows for name, part in parts.items()},
            "test_out_of_scope_rows": sum(g == OOS for g in gold)}


def classify(work: Path, inp: str, out: str, calibrated: bool, below: float | None = None) -> dict:
    from clsjob.config import ClassifyConfig, validate
    from clsjob.run.pipeline import run_classify

    return run_classify(validate({
        "input": {"path": str(work / inp), "label_column": "label"},
        "backend": {"model": str(work / "model"), "max_length": 64, "dtype": "float32",
                    "calibrated": calibrated},
        **({"abstain": {"label": OOS, "below": below}} if below is not None else {}),
        "resources": {"cpus_per_actor": 2},
        "output": {"path": str(work / out), "rows_per_part": 512},
    }, model=ClassifyConfig)).metrics


def raw_threshold(work: Path) -> float:
    """The threshold `finetune` would pick, on the eval rows' raw (uncalibrated) confidences."""
    from clsjob.evaluation.abstain import pick_threshold

    classify(work, "eval", "eval-raw", calibrated=False)
    rows = read_output(work / "eval-raw")
    names = json.loads((work / "eval-raw" / "_manifest.json").read_text())["labels"]
    probs = np.array(rows.column("probs").to_pylist())
    gold = np.array([names.index(g) for g in rows.column("gold").to_pylist()])
    return pick_threshold(probs, gold, 0.02)


def scores(m: dict) -> dict:
    """In-scope accuracy (an in-scope row given out_of_scope counts as wrong), out-of-scope
    recall and precision, and ECE over all scored rows."""
    labels, matrix = m["labels"], np.array(m["confusion_matrix"])
    oos = labels.index(OOS) if OOS in labels else None
    inscope = [i for i, name in enumerate(labels) if name != OOS]
    # Without abstention out_of_scope is outside the label set: those gold rows are not scored.
    inscope_rows = matrix[inscope].sum()
    out = {"in_scope_accuracy": float(matrix[inscope, inscope].sum() / inscope_rows)}
    if oos is not None:
        out["oos_recall"] = m["per_class"][OOS]["recall"]
        out["oos_precision"] = m["per_class"][OOS]["precision"]
    else:
        out["oos_recall"] = 0.0  # the model gives every row an in-scope intent
    out["ece"] = m["expected_calibration_error"]
    return out


def best_recall(lost: np.ndarray, recall: np.ndarray, budgets: tuple[int, ...]) -> dict:
    """Per budget, the best out-of-scope recall among the thresholds that lose at most that many
    points of in-scope accuracy (`lost` and `recall` run over the same thresholds); None where
    none does."""
    return {f"recall_at_{b}_points": float(recall[lost <= b].max()) if (lost <= b).any() else None
            for b in budgets}


def tradeoff(out: Path) -> dict:
    """Out-of-scope recall against in-scope points lost over every threshold (0.001 steps),
    from a run without abstention: what any threshold on this confidence could reach."""
    rows = read_output(out, ["gold", "label", "confidence"])
    gold = np.array(rows.column("gold").to_pylist())
    conf = np.array(rows.column("confidence").to_pylist(), dtype=np.float64)
    right = (np.array(rows.column("label").to_pylist()) == gold) & (gold != OOS)
    inscope, oos = (gold != OOS).sum(), (gold == OOS).sum()
    thresholds = np.arange(0, 1.001, 0.001)
    lost = np.array([100 * (right & (conf < t)).sum() / inscope for t in thresholds])
    recall = np.array([((gold == OOS) & (conf < t)).sum() / oos for t in thresholds])
    return best_recall(lost, recall, (1, 2, 5, 10, 20)) | {
        "points_lost_for_recall_0.7": float(lost[recall >= 0.7].min()) if (recall >= 0.7).any() else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "open_set.json"))
    args = parser.parse_args()
    env = environment()
    if not start_real_data_ray():
        return 2

    task, started = TASKS["banking77"], time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        split = write_splits(work)
        trained = finetune_minilm(task, work, abstain_accuracy_loss=0.02)
        fit = trained["calibration"]
        thresholds = {"raw": raw_threshold(work), "calibrated": fit["abstain"]["below"]}
        runs = {}
        for conf in ("raw", "calibrated"):
            plain = scores(classify(work, "test", f"{conf}-plain", conf == "calibrated"))
            abstained = scores(classify(work, "test", f"{conf}-abstain", conf == "calibrated",
                                        thresholds[conf]))
            runs[conf] = {"threshold": thresholds[conf], "without": plain, "with": abstained,
                          "any_threshold": tradeoff(work / f"{conf}-plain"),
                          "in_scope_points_lost": round(100 * (plain["in_scope_accuracy"]
                                                               - abstained["in_scope_accuracy"]), 2)}
    target = TARGETS["open_set"]
    for run in runs.values():
        run["met"] = bool(run["with"]["oos_recall"] >= target["oos_recall"]
                          and run["in_scope_points_lost"] <= target["points_lost"])
    result = {"split": split, "fit": fit, "runs": runs, "target": target,
              "wall_time_s": round(time.monotonic() - started, 1)}
    print(json.dumps(result, indent=2), flush=True)
    curve = markdown_table(
        ["confidence", *[f"OOS recall at ≤ {b} points" for b in (1, 2, 5, 10, 20)],
         "points lost for recall 0.7"],
        [[conf, *[f"{r['any_threshold'][f'recall_at_{b}_points']:.3f}" for b in (1, 2, 5, 10, 20)],
          r["any_threshold"]["points_lost_for_recall_0.7"]] for conf, r in runs.items()])
    f = lambda x: f"{x:.4f}"  # noqa: E731
    table = markdown_table(
        ["confidence", "threshold", "in-scope acc. without → with", "points lost",
         "OOS recall without → with", "OOS precision", "ECE (without)", "met"],
        [[conf, f"{r['threshold']:.3f}",
          f"{f(r['without']['in_scope_accuracy'])} → {f(r['with']['in_scope_accuracy'])}",
          r["in_scope_points_lost"], f"{f(r['without']['oos_recall'])} → {f(r['with']['oos_recall'])}",
          f(r["with"]["oos_precision"]), f(r["without"]["ece"]), "yes" if r["met"] else "no"]
         for conf, r in runs.items()])
    write_report(result | {"environment": env}, Path(args.out),
                 f"\n{table}\n\nAny threshold on the same confidences:\n\n{curve}\n\n{environment_line(env)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
