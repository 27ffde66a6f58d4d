"""Multi-label pure parts: metrics from additive counts against scikit-learn on random
inputs, threshold tuning against a brute-force search, the answer schema and its parser."""
import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, hamming_loss, precision_recall_fscore_support

from clsjob.evaluation.multilabel import (answer_schema, count_multilabel, parse_answer, summarize_multilabel,
                                          tune_thresholds)
from clsjob.labels import LabelSet

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
    # At most one of each label; no uniqueItems, which guidance refuses (answer_schema).
    assert schema["properties"]["labels"]["maxItems"] == 5 and "uniqueItems" not in schema["properties"]["labels"]
    assert schema["required"] == ["labels", "reasoning"]
    assert answer_schema(LABELS)["required"] == ["labels"]
    assert parse_answer(json.dumps({"labels": ["fear", "anger"]}), LABELS) == (["anger", "fear"], None)
    assert parse_answer('{"labels": []}', LABELS) == ([], None)  # nothing applies: allowed
    assert parse_answer('{"labels": ["anger", "boredom"]}', LABELS) == (
        None, "answer names labels outside the set: ['boredom']")
    assert parse_answer('{"labels": ["joy", "joy"]}', LABELS) == (["joy"], None)  # counted once
    assert parse_answer('{"label": "joy"}', LABELS) == (None, "answer has no list of labels")
    assert parse_answer('{"labels": ', LABELS)[1].startswith("answer is not JSON")


def test_counts_survive_json_and_the_run_tally_adds_them():
    """The counts travel as JSON in each part's record and shard marker: a round trip and
    an addition in the run's Tally change nothing."""
    from clsjob.evaluation.metrics import count_multilabel_rows
    from clsjob.evaluation.tally import Tally
    from clsjob.task import MULTI_LABEL

    rng = np.random.default_rng(3)
    gold, pred = random_sets(rng, 80, 5, 0.3), random_sets(rng, 80, 5, 0.3)
    names = lambda m: [[LABELS.names[k] for k in np.flatnonzero(r)] for r in m]  # noqa: E731
    g, p = names(gold), names(pred)
    g[0], g[1] = None, ["joy", "boredom"]  # no gold; a gold label outside the set
    errors = [None] * 80
    errors[2] = "text is null"
    parts = [count_multilabel_rows(LABELS, g[s], p[s], [0.5] * 40, errors[s])
             for s in (slice(0, 40), slice(40, 80))]
    run = Tally(n_labels=5)
    for part in parts:
        run.add(Tally.from_json(json.loads(json.dumps(part.to_json()))))
    m = MULTI_LABEL.summarize(LABELS, run)
    assert (m["rows"], m["rows_scored"], m["rows_errored"], m["gold_missing"],
            m["gold_outside_labels_values"]) == (80, 77, 1, 1, {"boredom": 1})
    keep = [i for i in range(80) if i not in (0, 1, 2)]
    _, _, f1, _ = precision_recall_fscore_support(gold[keep], pred[keep], average="macro", zero_division=0)
    assert m["task"] == "multi_label" and m["f1_macro"] == pytest.approx(f1)
    # The distribution counts every label given, on every labelled row (gold or not).
    assert run.distribution.label_counts.tolist() == pred[[i for i in range(80) if i != 2]].sum(axis=0).tolist()


def test_decide_gives_labels_over_thresholds_and_the_closest_calls_distance():
    from clsjob.evaluation.multilabel import decide

    probs = np.array([[0.9, 0.1, 0.35], [0.5, 0.2, 0.05]])
    thresholds = np.array([0.5, 0.2, 0.3])
    applies, confidence = decide(probs, thresholds)
    assert applies.tolist() == [[True, False, True], [True, True, False]]
    # Row 0: (0.9-0.5)/0.5 = 0.8, (0.2-0.1)/0.2 = 0.5, (0.35-0.3)/0.7 = 0.0714 -> the least.
    # Row 1: on two thresholds exactly -> 0.
    assert confidence == pytest.approx([0.05 / 0.7, 0.0])


def test_a_model_folders_thresholds_are_read_in_label_order():
    from clsjob.model_folder import thresholds as model_thresholds

    config = {"clsjob_thresholds": {"joy": 0.3, "anger": 0.7}}
    assert model_thresholds(config, LABELS, "m").tolist() == [0.7, 0.3, 0.5, 0.5, 0.5]
    assert model_thresholds({}, LABELS, "m").tolist() == [0.5] * 5
    with pytest.raises(ValueError, match="m: config.json's clsjob_thresholds"):
        model_thresholds({"clsjob_thresholds": {"joy": 1.5}}, LABELS, "m")
