"""Could any out-of-scope score reach the open-set target, not only (calibrated) confidence?
On the open set of `open_set.py` (Banking77, all-MiniLM-L6-v2 fine-tuned through clsjob on 60
intents, the 17 unseen ones out of scope), the common post-hoc scores side by side: max
softmax, max logit, energy, and the embedding distances of the OOD literature — Mahalanobis
distance to the nearest class mean (one shared covariance, fitted on the train rows) and
cosine kNN to the train rows — on the final layer's [CLS] state and its mean over tokens.

For each: AUROC (in scope against out of scope, test rows); the best out-of-scope recall any
threshold reaches at 2, 5 and 10 points of in-scope accuracy lost; and the recall and points
lost on test with the threshold picked on the eval rows by `finetune`'s rule
(`abstain.pick_threshold`: at most 2 points of eval accuracy).

    .venv/bin/python bench/open_set_scores.py [--work DIR] [--out FILE.json]

`--work DIR` keeps the split and the model in DIR (and reuses them there). CPU: ~15 min.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from common import REPO, TARGETS, environment, environment_line, markdown_table, start_real_data_ray, write_report
from finetune_accuracy import TASKS, finetune_minilm
from open_set import OOS, write_splits


def features(model_dir: Path, part: Path) -> dict:
    """Gold labels, logits, the final [CLS] state and the mean final state of a split."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    table = pq.read_table(part / "part-0.parquet")
    texts = table.column("text").to_pylist()
    out = {"logits": [], "cls": [], "mean": []}
    with torch.inference_mode():
        for start in range(0, len(texts), 128):
            batch = tokenizer(texts[start:start + 128], truncation=True, max_length=64, padding=True,
                              return_tensors="pt")
            result = model(**batch, output_hidden_states=True)
            last, mask = result.hidden_states[-1], batch["attention_mask"].unsqueeze(-1).float()
            out["logits"].append(result.logits.numpy())
            out["cls"].append(last[:, 0].numpy())
            out["mean"].append(((last * mask).sum(1) / mask.sum(1)).numpy())
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return {"gold": table.column("label").to_pylist(), "labels": names,
            **{k: np.concatenate(v).astype(np.float64) for k, v in out.items()}}


def mahalanobis(train: np.ndarray, gold: np.ndarray):
    """Score = minus the squared distance to the nearest class mean, under one covariance
    shared by the classes (with a small ridge: 384 dimensions, ~7k rows)."""
    classes = np.unique(gold)
    means = np.stack([train[gold == c].mean(0) for c in classes])
    centred = train - means[np.searchsorted(classes, gold)]
    cov = centred.T @ centred / len(train)
    precision = np.linalg.inv(cov + 1e-6 * np.trace(cov) / len(cov) * np.eye(len(cov)))

    def score(x: np.ndarray) -> np.ndarray:
        xp = x @ precision
        return -((xp * x).sum(1)[:, None] - 2 * xp @ means.T
                 + ((means @ precision) * means).sum(1)[None]).min(1)
    return score


def knn(train: np.ndarray, k: int):
    """Score = cosine similarity to the k-th nearest train row."""
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    return lambda x: -np.sort(-(x / np.linalg.norm(x, axis=1, keepdims=True)) @ unit.T, axis=1)[:, k - 1]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def score_functions(train: dict, train_gold: np.ndarray) -> dict:
    scores = {"max softmax": lambda f: softmax(f["logits"]).max(1),
              "max logit": lambda f: f["logits"].max(1),
              "energy (logsumexp)": lambda f: np.log(np.exp(f["logits"] - f["logits"].max(1, keepdims=True))
                                                      .sum(1)) + f["logits"].max(1)}
    for feature in ("cls", "mean"):
        distance = mahalanobis(train[feature], train_gold)
        scores[f"Mahalanobis, {feature}"] = lambda f, d=distance, name=feature: d(f[name])
        for k in (1, 10):
            near = knn(train[feature], k)
            scores[f"kNN k={k}, {feature}"] = lambda f, n=near, name=feature: n(f[name])
    return scores


def judge(test_score, right, oos, eval_score, eval_right) -> dict:
    """AUROC, any threshold's best recall at each budget, and the eval-picked threshold's."""
    from sklearn.metrics import roc_auc_score

    from clsjob.evaluation.abstain import pick_threshold

    inscope = ~oos
    auroc = roc_auc_score(np.r_[np.ones(inscope.sum()), np.zeros(oos.sum())],
                          np.r_[test_score[inscope], test_score[oos]])
    thresholds = np.r_[np.unique(test_score), np.inf]  # abstain where score < threshold
    lost = 100 * np.searchsorted(np.sort(test_score[right]), thresholds) / inscope.sum()
    recall = np.searchsorted(np.sort(test_score[oos]), thresholds) / oos.sum()
    # pick_threshold ranks rows by their top probability: one column holding the score, and
    # "gold" 0 where the row is right, so the same rule picks on any score.
    below = pick_threshold(eval_score[:, None], np.where(eval_right, 0, 1), 0.02)
    kept = test_score >= below
    return {"auroc": round(float(auroc), 4),
            **{f"recall_at_{b}_points": round(float(recall[lost <= b + 1e-9].max()), 3) for b in (2, 5, 10)},
            "picked_recall": round(float((oos & ~kept).sum() / oos.sum()), 3),
            "picked_points_lost": round(float(100 * (right & ~kept).sum() / inscope.sum()), 2)}


def measure(work: Path) -> dict:
    if not (work / "model").is_dir():
        write_splits(work)
        finetune_minilm(TASKS["banking77"], work)
    started = time.monotonic()
    split = {name: features(work / "model", work / name) for name in ("train", "eval", "test")}
    index = {name: i for i, name in enumerate(split["train"]["labels"])}
    train_gold = np.array([index[g] for g in split["train"]["gold"]])
    test_gold = np.array(split["test"]["gold"])
    oos = test_gold == OOS
    right = ~oos & (split["test"]["logits"].argmax(1) == np.array([index.get(g, -1) for g in test_gold]))
    eval_right = split["eval"]["logits"].argmax(1) == np.array([index[g] for g in split["eval"]["gold"]])
    rows = {name: judge(f(split["test"]), right, oos, f(split["eval"]), eval_right)
            for name, f in score_functions(split["train"], train_gold).items()}
    return {"test_rows": len(test_gold), "test_out_of_scope_rows": int(oos.sum()),
            "in_scope_accuracy": round(float(right.sum() / (~oos).sum()), 4),
            "features_and_scores_s": round(time.monotonic() - started, 1), "scores": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="keep (or reuse) the split and model here")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "open_set_scores.json"))
    args = parser.parse_args()
    env = environment()
    if not (args.work and (args.work / "model").is_dir()) and not start_real_data_ray():
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = measure(work)
    target = TARGETS["open_set"]
    met = [name for name, r in result["scores"].items()
           if r["picked_recall"] >= target["oos_recall"] and r["picked_points_lost"] <= target["points_lost"]]
    table = markdown_table(["score", "AUROC", "any @2", "@5", "@10", "picked recall", "picked pts lost"],
                           [[name, r["auroc"], r["recall_at_2_points"], r["recall_at_5_points"],
                             r["recall_at_10_points"], r["picked_recall"], r["picked_points_lost"]]
                            for name, r in result["scores"].items()])
    write_report({"environment": env, "target": target, **result, "target_met_by": met}, Path(args.out),
                 f"{environment_line(env)}\n{table}\nin-scope accuracy without abstention "
                 f"{result['in_scope_accuracy']}; target met by: {met or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
