"""Abstention: a row whose (calibrated) confidence is under a threshold gets a fallback label,
or no label and an error, instead of the in-scope label the model was least sure of. Real
traffic holds rows that fit no label; a classifier still gives each one of its labels.

Pure functions: the write stage applies the rule to each labelled part, the metrics score the
fallback label as one more class (its recall is the out-of-scope recall), and `finetune`
picks a threshold on its eval rows (`pick_threshold`) that `merge` writes into config.json.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clsjob import model_folder
from clsjob.config import AbstainConfig
from clsjob.labels import LabelError, LabelSet

BELOW = "below confidence threshold"


def below_threshold_error(below: float) -> str:
    return f"{BELOW} {below:g}"


def apply_abstention(table: pa.Table, rule: AbstainConfig | None) -> pa.Table:
    """Rows labelled with a confidence under `rule.below` get `rule.label`, or (label null) no
    label and the error `below confidence threshold <below>`; `confidence` and `probs` stay
    the model's, so a reader sees how sure it was. Rows already in error are left alone."""
    if rule is None or not table.num_rows:
        return table
    under = pc.fill_null(pc.and_(pc.is_null(table.column("error")),
                                 pc.less(table.column("confidence"), rule.below)), False)
    if not pc.any(under).as_py():
        return table
    i = table.column_names.index("label")
    fallback = pa.scalar(rule.label, pa.string())
    table = table.set_column(i, "label", pc.if_else(under, fallback, table.column("label")))
    if rule.label is None:
        j = table.column_names.index("error")
        error = pa.scalar(below_threshold_error(rule.below), pa.string())
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
    loses nothing. Rows are ranked by confidence; the threshold sits just above the last row
    it may give up (the confidence of the first row it keeps)."""
    probs, gold = np.asarray(probs, dtype=np.float64), np.asarray(gold)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == gold
    order = np.argsort(confidence, kind="stable")
    budget = int(np.floor(max_accuracy_loss * len(gold) + 1e-9))  # right rows it may give up
    lost = np.cumsum(correct[order])
    # Give up the lowest rows while the right ones among them stay within budget.
    # Rows tied with the first one kept are kept too (the rule is "< below"): never more lost.
    k = int(np.searchsorted(lost, budget, side="right"))
    return float(confidence[order[k]]) if k < len(order) else float(np.nextafter(confidence.max(), 2))


def settle_rule(rule: AbstainConfig | None, labels: LabelSet, folder_config: dict | None,
                model: str) -> AbstainConfig | None:
    """The rule the run applies, checked on the driver: a missing `below` is the model
    folder's (`folder_config`: its config.json)."""
    if rule is None:
        return None
    if rule.below is not None:
        return rule
    below = model_folder.abstain_below(folder_config or {})
    if below is None:
        found = (folder_config or {}).get(model_folder.ABSTAIN_KEY)
        raise LabelError(f"abstain.below is not set and backend.model {model} carries no usable "
                         f"{model_folder.ABSTAIN_KEY} in config.json (found {found!r}); set "
                         f"abstain.below, or fine-tune with eval rows and merge")
    return rule.model_copy(update={"below": below})
