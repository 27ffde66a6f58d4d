"""The end of a fine-tune with `training.distance_index_rows`: the index that classify's
`abstain.score: distance` measures rows against, and its threshold.

A class-balanced sample of the training rows goes through the trained model once; their
representations (representation.py: what the head turns into logits) are the index, float16
at unit length, saved beside the model as `clsjob_distance_index.npy` (model_folder.py). The
eval rows go through too: the threshold is the lowest distance whose rows beyond it cost at
most `training.abstain_accuracy_loss` of eval accuracy, as the confidence threshold is picked.

With QLoRA the rows are embedded by the 4-bit model the adapter was trained on; the merged
model the back end runs has full-precision weights, so its representations differ slightly
(the same mismatch its logits have)."""
from __future__ import annotations

import logging
import time

import numpy as np

from clsjob.backends.hf import DEVICE_MICRO_BATCH, predict
from clsjob.evaluation.abstain import pick_distance_threshold
from clsjob.evaluation.distance import balanced_sample, knn_distance, knn_index

log = logging.getLogger("clsjob")


def build_distance_index(model, tokenizer, labels, train_rows: list[dict], eval_rows: list[dict],
                         training, device: str) -> tuple[np.ndarray, dict]:
    """(the index, what the summary records of it: k, above, rows, ...). `*_rows`: the
    fine-tune's encoded rows ({"input_ids", "labels", ...})."""
    started = time.monotonic()
    micro_batch = DEVICE_MICRO_BATCH["cuda" if device.startswith("cuda") else "cpu"]
    model.eval()
    gold = np.array([row["labels"] for row in train_rows])
    per_class = max(1, training.distance_index_rows // len(labels))
    kept = balanced_sample(gold, per_class, seed=training.seed)
    _, reps = predict(model, tokenizer, [train_rows[i]["input_ids"] for i in kept], micro_batch,
                      device, represent=True)
    index = knn_index(reps)
    info = {"k": training.distance_k, "above": None, "rows": len(index), "per_class": per_class,
            "max_accuracy_loss": training.abstain_accuracy_loss}
    if eval_rows:
        probs, eval_reps = predict(model, tokenizer, [row["input_ids"] for row in eval_rows],
                                   micro_batch, device, represent=True)
        correct = probs.argmax(axis=1) == np.array([row["labels"] for row in eval_rows])
        distance = knn_distance(eval_reps, index, training.distance_k)
        # Rounded up for the record: a row the pick keeps stays kept.
        above = float(np.ceil(pick_distance_threshold(distance, correct,
                                                      training.abstain_accuracy_loss) * 1e6) / 1e6)
        info.update(above=above, eval_rows=len(eval_rows),
                    eval_rows_above=int((distance > above).sum()),
                    eval_distance_median=round(float(np.median(distance)), 6))
    info["seconds"] = round(time.monotonic() - started, 1)
    log.info("finetune: distance index of %d training rows (at most %d a label), k %d; "
             "threshold %s picked on %d eval rows (%s over it), %.1f s", info["rows"], per_class,
             info["k"], info["above"], len(eval_rows), info.get("eval_rows_above", "none"),
             info["seconds"])
    return index, info
