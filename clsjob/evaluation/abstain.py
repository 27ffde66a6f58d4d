"""Abstention: a row whose (calibrated) confidence is under a threshold — or, with `score:
distance`, whose representation lies further than a threshold from the training rows
(`ood_score`, distance.py) — gets a fallback label, or no label and an error, instead of the
in-scope label the model guessed. Real traffic holds rows that fit no label; a classifier
still gives each one of its labels.

Pure functions: the write stage applies the rule to each labelled part, the metrics score the
fallback label as one more class (its recall is the out-of-scope recall), and `finetune`
picks the thresholds on its eval rows (`pick_threshold`, `pick_distance_threshold`) that
`merge` writes into config.json.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clsjob import model_folder
from clsjob.config import AbstainConfig
from clsjob.labels import LabelError, LabelSet

BELOW = "below confidence threshold"
OVER = "over distance threshold"
# The column `score: distance` reads (the hf back end fills it).
OOD_SCORE = "ood_score"


def abstained_error(rule: AbstainConfig) -> str:
    if rule.score == "distance":
        return f"{OVER} {rule.above:g}"
    return f"{BELOW} {rule.below:g}"


def apply_abstention(table: pa.Table, rule: AbstainConfig | None) -> pa.Table:
    """Rows labelled with a confidence under `rule.below` (score: distance: an ood_score over
    `rule.above`) get `rule.label`, or (label null) no label and the error saying which
    threshold; `confidence`, `probs` and `ood_score` stay the model's, so a reader sees how
    sure it was. Rows already in error are left alone."""
    if rule is None or not table.num_rows:
        return table
    outside = (pc.greater(table.column(OOD_SCORE), rule.above) if rule.score == "distance"
               else pc.less(table.column("confidence"), rule.below))
    under = pc.fill_null(pc.and_(pc.is_null(table.column("error")), outside), False)
    if not pc.any(under).as_py():
        return table
    i = table.column_names.index("label")
    fallback = pa.scalar(rule.label, pa.string())
    table = table.set_column(i, "label", pc.if_else(under, fallback, table.column("label")))
    if rule.label is None:
        j = table.column_names.index("error")
        error = pa.scalar(abstained_error(rule), pa.string())
        table = table.set_column(j, "error", pc.if_else(under, error, table.column("error")))
    return table


def scored_labels(labels: LabelSet, rule: AbstainConfig | None) -> LabelSet:
    """The classes the metrics score: the model's labels and, with a fallback label the model
    does not give, that label last (gold rows carrying it are then scored, not set aside as
    outside the set). A fallback that is one of the model's labels (a model trained with an
    "out of scope" class) is scored as that class."""
    if rule is None or rule.label is None or rule.label in labels:
        return labels
    return LabelSet((*labels.names, rule.label))


def pick_threshold(probs: np.ndarray, gold: np.ndarray, max_accuracy_loss: float) -> float:
    """The highest confidence threshold that costs at most `max_accuracy_loss` of accuracy on
    these (in-scope) rows: abstaining on a row the model got right loses it, on a wrong one
    loses nothing."""
    probs, gold = np.asarray(probs, dtype=np.float64), np.asarray(gold)
    return keep_threshold(probs.max(axis=1), probs.argmax(axis=1) == gold, max_accuracy_loss)


def pick_distance_threshold(distance: np.ndarray, correct: np.ndarray,
                            max_accuracy_loss: float) -> float:
    """The lowest distance threshold (rows over it abstain) that costs at most
    `max_accuracy_loss` of accuracy on these in-scope rows (`correct`: the model's answer was
    right)."""
    return -keep_threshold(-np.asarray(distance, dtype=np.float64), correct, max_accuracy_loss)


def keep_threshold(score: np.ndarray, correct: np.ndarray, max_accuracy_loss: float) -> float:
    """The highest t such that giving up the rows whose `score` is under t costs at most
    `max_accuracy_loss` of the rows, counting only the rows the model got right. Rows are
    ranked by score; t sits just above the last row it may give up (the score of the first
    row it keeps)."""
    score, correct = np.asarray(score, dtype=np.float64), np.asarray(correct, dtype=bool)
    order = np.argsort(score, kind="stable")
    budget = int(np.floor(max_accuracy_loss * len(score) + 1e-9))  # right rows it may give up
    lost = np.cumsum(correct[order])
    # Give up the lowest rows while the right ones among them stay within budget.
    # Rows tied with the first one kept are kept too (the rule is "< t"): never more lost.
    k = int(np.searchsorted(lost, budget, side="right"))
    return float(score[order[k]]) if k < len(order) else float(np.nextafter(score.max(), np.inf))


def settle_rule(rule: AbstainConfig | None, folder_config: dict | None, model: str | None,
                folder_files: list[str] = ()) -> AbstainConfig | None:
    """The rule the run applies, checked on the driver: a threshold left out is the model
    folder's (`folder_config`: its config.json; `folder_files`: the names in it), and score:
    distance needs the folder's index."""
    if rule is None:
        return None
    if rule.score == "distance":
        try:
            _, above = model_folder.distance_settings(folder_config or {}, f"backend.model {model}",
                                                      rule.distance_kind())
        except ValueError as exc:
            raise LabelError(f"abstain.score: distance: {exc}") from None
        needed = model_folder.DISTANCE_KINDS[rule.distance_kind()][0]
        if needed not in folder_files:
            raise LabelError(f"abstain.score: distance ({rule.distance_kind()}): backend.model {model} "
                             f"has no {needed}; merge a fine-tune run with "
                             f"training.distance_index_rows")
        if rule.above is not None:
            return rule
        if above is None:
            raise LabelError(f"abstain.above is not set and backend.model {model} carries no "
                             f"threshold (its fine-tune had no eval rows); set abstain.above")
        return rule.model_copy(update={"above": above})
    if rule.below is not None:
        return rule
    below = model_folder.abstain_below(folder_config or {})
    if below is None:
        found = (folder_config or {}).get(model_folder.ABSTAIN_KEY)
        raise LabelError(f"abstain.below is not set and backend.model {model} carries no usable "
                         f"{model_folder.ABSTAIN_KEY} in config.json (found {found!r}); set "
                         f"abstain.below, or fine-tune with eval rows and merge")
    return rule.model_copy(update={"below": below})
