"""The end of a fine-tune with `training.distance_index_rows`: the index that classify's
`abstain.score: distance` measures rows against, and its threshold.

A class-balanced sample of the training rows goes through the trained model once; their
representations (representation.py: what the head turns into logits) are the index, float16
at unit length, saved beside the model as `clsjob_distance_index.npy` (model_folder.py). The
eval rows go through too: the threshold is the lowest distance whose rows beyond it cost at
most `training.abstain_accuracy_loss` of eval accuracy, as the confidence threshold is picked.
The same rows' class means and shared covariance (distance.ClassGaussians, at unit length)
are kept too (`clsjob_distance_gaussians.npz`), with a threshold of their own:
`abstain.distance: mahalanobis`.

With QLoRA the rows are embedded by the 4-bit model the adapter was trained on; the merged
model the back end runs has full-precision weights, so its representations differ slightly
(the same mismatch its logits have)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from clsjob.backends.hf import DEVICE_MICRO_BATCH, predict
from clsjob.evaluation.abstain import pick_distance_threshold
from clsjob.evaluation.distance import (ClassGaussians, balanced_sample, knn_distance, knn_index,
                                        normalized)

log = logging.getLogger("clsjob")


@dataclass(frozen=True)
class DistanceIndex:
    knn: np.ndarray  # the training rows, float16, unit length
    gaussians: ClassGaussians  # their class means and shared precision


def threshold(distance: np.ndarray, correct: np.ndarray, max_accuracy_loss: float) -> float:
    """The distance threshold picked on the eval rows, rounded up for the record: a row the
    pick keeps stays kept."""
    return float(np.ceil(pick_distance_threshold(distance, correct, max_accuracy_loss) * 1e6) / 1e6)


def build_distance_index(model, tokenizer, labels, train_rows: list[dict], eval_rows: list[dict],
                         training, device: str) -> tuple[DistanceIndex, dict]:
    """(the index, what the summary records of it: k, above, mahalanobis_above, rows, ...).
    `*_rows`: the fine-tune's encoded rows ({"input_ids", "labels", ...})."""
    started = time.monotonic()
    micro_batch = DEVICE_MICRO_BATCH["cuda" if device.startswith("cuda") else "cpu"]
    model.eval()
    gold = np.array([row["labels"] for row in train_rows])
    per_class = max(1, training.distance_index_rows // len(labels))
    kept = balanced_sample(gold, per_class, seed=training.seed)
    _, reps = predict(model, tokenizer, [train_rows[i]["input_ids"] for i in kept], micro_batch,
                      device, represent=True)
    index = DistanceIndex(knn_index(reps), ClassGaussians.fit(normalized(reps), gold[kept]))
    info = {"k": training.distance_k, "above": None, "mahalanobis_above": None,
            "rows": len(index.knn), "per_class": per_class,
            "max_accuracy_loss": training.abstain_accuracy_loss}
    if eval_rows:
        probs, eval_reps = predict(model, tokenizer, [row["input_ids"] for row in eval_rows],
                                   micro_batch, device, represent=True)
        correct = probs.argmax(axis=1) == np.array([row["labels"] for row in eval_rows])
        loss = training.abstain_accuracy_loss
        distance = knn_distance(eval_reps, index.knn, training.distance_k)
        mahalanobis = index.gaussians.distance(normalized(eval_reps))
        above, m_above = threshold(distance, correct, loss), threshold(mahalanobis, correct, loss)
        info.update(above=above, mahalanobis_above=m_above, eval_rows=len(eval_rows),
                    eval_rows_above=int((distance > above).sum()),
                    eval_rows_over_mahalanobis=int((mahalanobis > m_above).sum()),
                    eval_distance_median=round(float(np.median(distance)), 6))
    info["seconds"] = round(time.monotonic() - started, 1)
    log.info("finetune: distance index of %d training rows (at most %d a label), k %d; "
             "thresholds knn %s, mahalanobis %s picked on %d eval rows, %.1f s", info["rows"],
             per_class, info["k"], info["above"], info["mahalanobis_above"], len(eval_rows),
             info["seconds"])
    return index, info
