"""Multi-label pure parts: metrics from additive counts against scikit-learn on random
inputs, threshold tuning against a brute-force search, the answer schema and its parser."""
import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, hamming_loss, precision_recall_fscore_support

from clsjob.labels import LabelSet
from clsjob.multilabel import (answer_schema, count_multilabel, parse_answer, summarize_multilabel,
                               tune_thresholds)

LABELS = LabelSet(("anger", "joy", "fear", "surprise", "neutral"))


def random_sets(rng, rows: int, n: int, rate: float) -> np.ndarray:
    return rng.random((rows, n)) < rate


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_from_counts_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    gold, pred = random_sets(rng, 300, 5, 0.25), random_sets(rng, 300, 5, 0.3)
    gold[:, 4] = False  # a label nobody has: its ratios are 0, as sklearn's zero_division=0
    as_sets = lambda m: [np.flatnonzero(row).tolist() for row in m]  # noqa: E731
    # Counted in three parts and added up: what the write stage and the driver would do.
    total = count_multilabel(5, as_sets(gold[:100]), as_sets(pred[:100]))
    for part in (slice(100, 250), slice(250, 300)):
        total.add(count_multilabel(5, as_sets(gold[part]), as_sets(pred[part])))
    m = summarize_multilabel(total, LABELS)
    for average in ("micro", "macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(gold, pred, average=average, zero_division=0)
        assert (m[f"precision_{average}"], m[f"recall_{average}"], m[f"f1_{average}"]) == pytest.approx((p, r, f))
    p, r, f, s = precision_recall_fscore_support(gold, pred, average=None, zero_division=0)
    for k, name in enumerate(LABELS.names):
        assert m["per_label"][name] == pytest.approx({"precision": p[k], "recall": r[k], "f1": f[k], "support": s[k]})
    assert m["subset_accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert m["hamming_loss"] == pytest.approx(hamming_loss(gold, pred))
    assert m["label_cardinality"] == pytest.approx({"gold": gold.sum(1).mean(), "predicted": pred.sum(1).mean()})


def test_the_most_confused_pairs_count_missed_gold_against_wrong_predictions():
    t = count_multilabel(5, [[0], [0, 1], [0], [2]], [[1], [1, 3], [1, 2], []])
    m = summarize_multilabel(t, LABELS)
    # anger missed while joy was wrongly predicted: rows 1 and 3 (in row 2 joy is gold).
    assert m["most_confused"][0] == {"gold": "anger", "predicted": "joy", "rows": 2}
    assert {"gold": "anger", "predicted": "surprise", "rows": 1} in m["most_confused"]
    assert {"gold": "anger", "predicted": "fear", "rows": 1} in m["most_confused"]
    assert summarize_multilabel(count_multilabel(5, [], []), LABELS)["subset_accuracy"] is None


def test_thresholds_maximise_each_labels_f1_and_rare_labels_keep_the_default():
    rng = np.random.default_rng(0)
    gold = random_sets(rng, 400, 3, 0.3)
    gold[:, 2] = False
    gold[:3, 2] = True  # 3 gold rows: under min_support
    probs = np.clip(gold * 0.35 + rng.random((400, 3)) * 0.6, 0, 1)
    tuned = tune_thresholds(probs, gold, min_support=5)
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    for k in (0, 1):
        def f1(t):
            p = probs[:, k] >= t
            return 2 * (p & gold[:, k]).sum() / max(p.sum() + gold[:, k].sum(), 1)
        best = max(f1(t) for t in grid)
        assert f1(tuned[k]) == pytest.approx(best) and tuned[k] == min(t for t in grid if f1(t) == pytest.approx(best))
    assert tuned[2] == 0.5
    assert tuned[0] != 0.5 or tuned[1] != 0.5  # the search moved at least one of them


def test_the_answer_schema_and_parser():
    schema = answer_schema(LABELS, reasoning_max_chars=50)
    assert schema["properties"]["labels"]["items"]["enum"] == list(LABELS.names)
    assert schema["properties"]["labels"]["uniqueItems"] and schema["required"] == ["labels", "reasoning"]
    assert answer_schema(LABELS)["required"] == ["labels"]
    assert parse_answer(json.dumps({"labels": ["fear", "anger"]}), LABELS) == (["anger", "fear"], None)
    assert parse_answer('{"labels": []}', LABELS) == ([], None)  # nothing applies: allowed
    assert parse_answer('{"labels": ["anger", "boredom"]}', LABELS) == (
        None, "answer names labels outside the set: ['boredom']")
    assert parse_answer('{"labels": ["joy", "joy"]}', LABELS) == (None, "answer names a label twice")
    assert parse_answer('{"label": "joy"}', LABELS) == (None, "answer has no list of labels")
    assert parse_answer('{"labels": ', LABELS)[1].startswith("answer is not JSON")
