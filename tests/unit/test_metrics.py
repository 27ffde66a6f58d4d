from collections import Counter

import numpy as np
import pytest
from sklearn import metrics as sk

from clsjob.evaluation.metrics import COVERAGE_THRESHOLDS, count_rows, summarize
from clsjob.evaluation.report import render_report
from clsjob.evaluation.tally import Tally
from clsjob.labels import LabelSet

LABELS = LabelSet(("a", "b", "c", "d"))


def random_run(seed: int, n: int = 500):
    rng = np.random.default_rng(seed)
    k = len(LABELS)
    # Skewed classes, and class "d" never predicted, to exercise the zero-division paths.
    gold = rng.choice(k, size=n, p=[0.5, 0.3, 0.15, 0.05])
    pred = np.where(rng.random(n) < 0.7, gold, rng.choice(k - 1, size=n))
    pred = np.where(pred == 3, 0, pred)
    conf = rng.uniform(0.25, 1.0, size=n)
    return gold, pred, conf


@pytest.mark.parametrize("seed", range(5))
def test_scores_match_scikit_learn(seed):
    gold, pred, conf = random_run(seed)
    names = np.array(LABELS.names)
    m = summarize(LABELS, count_rows(LABELS, names[gold].tolist(), names[pred].tolist(), conf.tolist(),
                                [None] * len(gold)))
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(gold, pred))
    for avg in ("macro", "weighted"):
        p, r, f, _ = sk.precision_recall_fscore_support(gold, pred, average=avg, zero_division=0)
        assert m[f"precision_{avg}"] == pytest.approx(p)
        assert m[f"recall_{avg}"] == pytest.approx(r)
        assert m[f"f1_{avg}"] == pytest.approx(f)
    p, r, f, s = sk.precision_recall_fscore_support(gold, pred, labels=range(4), zero_division=0)
    for i, name in enumerate(LABELS.names):
        assert m["per_class"][name]["f1"] == pytest.approx(f[i])
        assert m["per_class"][name]["support"] == s[i]
    assert m["confusion_matrix"] == sk.confusion_matrix(gold, pred, labels=range(4)).tolist()


def test_expected_calibration_error_by_definition():
    gold, pred, conf = random_run(11, n=2000)
    names = np.array(LABELS.names)
    m = summarize(LABELS, count_rows(LABELS, names[gold].tolist(), names[pred].tolist(), conf.tolist(),
                                [None] * len(gold)))
    correct = (gold == pred).astype(float)
    bins = np.minimum((conf * 15).astype(int), 14)
    bins = np.where(conf * 15 == np.floor(conf * 15), np.maximum(bins - 1, 0), bins)  # right-closed
    expected = sum((bins == b).mean() * abs(correct[bins == b].mean() - conf[bins == b].mean())
                   for b in range(15) if (bins == b).any())
    assert m["expected_calibration_error"] == pytest.approx(expected)
    # Perfectly calibrated extreme: always right with confidence 1.0 -> ECE 0.
    perfect = summarize(LABELS, count_rows(LABELS, ["a"] * 10, ["a"] * 10, [1.0] * 10, [None] * 10))
    assert perfect["expected_calibration_error"] == pytest.approx(0.0)
    assert perfect["calibration"]["rows"][-1] == 10


def test_errors_missing_and_unknown_gold_are_counted_not_scored():
    m = summarize(LABELS, count_rows(
        LABELS,
        gold=["a", "b", None, "zzz", "zzz", "c"],
        predicted=["a", "a", "b", "c", "a", None],
        confidence=[0.9, 0.6, 0.5, 0.5, 0.7, None],
        errors=[None, None, None, None, None, "text is empty"]))
    assert (m["rows"], m["rows_scored"], m["rows_errored"]) == (6, 2, 1)
    assert m["gold_missing"] == 1 and m["gold_outside_labels"] == 2
    assert m["gold_outside_labels_values"] == {"zzz": 2}
    assert m["accuracy"] == pytest.approx(0.5)


def test_no_confidence_gives_null_ece():
    m = summarize(LABELS, count_rows(LABELS, ["a", "b"], ["a", "b"], [None, None], [None, None]))
    assert m["expected_calibration_error"] is None and m["accuracy"] == 1.0


def test_tallies_add_up_and_survive_json():
    gold, pred, conf = random_run(3, n=300)
    names = np.array(LABELS.names)
    args = lambda s: (names[gold[s]].tolist(), names[pred[s]].tolist(), conf[s].tolist(),
                      [None] * len(gold[s]))
    whole = summarize(LABELS, count_rows(LABELS, *args(slice(None))))
    parts = Tally(n_labels=4)
    for s in (slice(0, 100), slice(100, 250), slice(250, None)):
        parts.add(Tally.from_json(count_rows(LABELS, *args(s)).to_json()))
    merged = summarize(LABELS, parts, target_accuracy=0.9)
    assert merged["coverage"] == summarize(LABELS, count_rows(LABELS, *args(slice(None))), 0.9)["coverage"]
    assert merged["confusion_matrix"] == whole["confusion_matrix"]
    assert merged["expected_calibration_error"] == pytest.approx(whole["expected_calibration_error"])
    assert merged["f1_macro"] == pytest.approx(whole["f1_macro"])


def test_every_counter_adds_and_survives_json_and_an_older_marker_reads_as_zeros():
    from clsjob.evaluation.tally import COUNTERS

    gold, pred, conf = random_run(5, n=120)
    names = np.array(LABELS.names)
    probs = np.random.default_rng(5).dirichlet(np.ones(4), size=120)
    part = lambda s: count_rows(LABELS, names[gold[s]].tolist(), names[pred[s]].tolist(),
                                conf[s].tolist(), [None] * len(gold[s]), probs[s].tolist(), 0.5)
    one, two = part(slice(0, 50)), part(slice(50, None))
    both = Tally.from_json(one.to_json()).add(Tally.from_json(two.to_json()))
    for name, counter in COUNTERS.items():
        a, b, sum_ = getattr(one, name), getattr(two, name), getattr(both, name)
        assert set(a.to_json()) and set(a.to_json()) <= set(one.to_json())  # flat marker keys
        assert counter.from_json(a.to_json(), 4).to_json() == a.to_json()
        for key, value in sum_.to_json().items():  # each count of the sum is the two parts'
            x, y = a.to_json()[key], b.to_json()[key]
            if key in ("coverage", "confidence_counts"):  # sparse [bin, counts...]: densify
                dense = lambda rows: {r[0]: np.array(r[1:]) for r in rows}
                x, y, value = dense(x), dense(y), dense(value)
                assert all(np.array_equal(value[k], x.get(k, 0) + y.get(k, 0)) for k in value)
            elif key == "gold_unknown":
                assert value == dict(Counter(x) + Counter(y))
            else:
                assert np.allclose(np.array(value, dtype=float), np.array(x, dtype=float) + np.array(y, dtype=float))
    # A marker written before coverage, NLL, the distribution and the raw counts existed.
    old = {k: v for k, v in one.to_json().items()
           if not k.startswith(("coverage", "nll_", "label_counts", "confidence_", "raw_"))}
    back = Tally.from_json(old)
    assert back.coverage.rows.sum() == 0 and back.calibration.nll_rows == 0
    assert back.distribution.label_counts.sum() == 0 and back.uncalibrated.rows.sum() == 0
    assert back.confusion.matrix.tolist() == one.confusion.matrix.tolist()


def test_negative_log_likelihood_matches_scikit_learn_across_parts():
    rng = np.random.default_rng(7)
    gold = rng.choice(4, size=400)
    probs = rng.dirichlet(np.ones(4), size=400)
    names = np.array(LABELS.names)
    args = lambda s: (names[gold[s]].tolist(), names[probs[s].argmax(1)].tolist(),
                      probs[s].max(1).tolist(), [None] * len(gold[s]), probs[s].tolist())
    parts = Tally(n_labels=4)
    for s in (slice(0, 150), slice(150, None)):
        parts.add(Tally.from_json(count_rows(LABELS, *args(s)).to_json()))
    assert summarize(LABELS, parts)["negative_log_likelihood"] == pytest.approx(
        sk.log_loss(gold, probs, labels=range(4)), rel=1e-9)
    # A scored row without probabilities (a generating back end) leaves no number to report.
    mixed = count_rows(LABELS, ["a", "b"], ["a", "b"], [0.9, None], [None, None], [[.9, .1, 0, 0], None])
    assert summarize(LABELS, mixed)["negative_log_likelihood"] is None
    assert summarize(LABELS, count_rows(LABELS, *args(slice(0, 10))[:4]))["negative_log_likelihood"] is None


@pytest.mark.parametrize("seed", range(3))
def test_coverage_table_against_a_brute_force_count(seed):
    gold, pred, conf = random_run(seed, n=2000)
    # Confidence that means something: right answers are more confident.
    conf = np.where(gold == pred, np.sqrt(conf), conf ** 2)
    names = np.array(LABELS.names)
    m = summarize(LABELS, count_rows(LABELS, names[gold].tolist(), names[pred].tolist(),
                                     conf.tolist(), [None] * len(gold)), target_accuracy=0.95)
    table = m["coverage"]
    assert table["rows_scored"] == len(gold)
    assert [t["threshold"] for t in table["thresholds"]] == list(COVERAGE_THRESHOLDS)
    for t in table["thresholds"]:
        kept = conf >= t["threshold"]
        assert t["rows"] == kept.sum() and t["coverage"] == pytest.approx(kept.mean())
        assert t["accuracy"] == (pytest.approx((gold == pred)[kept].mean()) if kept.any() else None)
    # The lowest threshold in steps of 0.001 whose kept rows reach 95%, found by trying each.
    steps = [k / 1000 for k in range(1000)]
    reach = [th for th in steps if (conf >= th).any() and (gold == pred)[conf >= th].mean() >= 0.95]
    assert table["target"]["threshold"] == pytest.approx(reach[0])
    assert table["target"]["accuracy"] >= 0.95
    assert table["target"]["coverage"] == pytest.approx((conf >= reach[0]).mean())
    report = render_report({**m, "rows_per_s": None})
    assert "## Accuracy against coverage" in report and f"confidence ≥ {reach[0]:.3f}" in report


def test_unreachable_target_and_no_confidence():
    # The most confident row is the wrong one: no threshold keeps only right rows.
    m = summarize(LABELS, count_rows(LABELS, ["a", "b"], ["a", "a"], [0.8, 0.9], [None, None]),
                  target_accuracy=0.99)
    assert m["coverage"]["target"] is None
    assert "no threshold reaches it" in render_report({**m, "rows_per_s": None})
    # The generating modes give no confidence: no table, rather than one over nothing.
    m = summarize(LABELS, count_rows(LABELS, ["a"], ["a"], [None], [None]), target_accuracy=0.9)
    assert m["coverage"] is None


def test_nothing_to_score_gives_null_metrics_and_says_why():
    # A hostile shard: every gold label outside the label set.
    m = summarize(LABELS, count_rows(LABELS, ["x"] * 13, ["a"] * 13, [0.9] * 13, [None] * 13))
    assert m["rows_scored"] == 0 and m["gold_outside_labels"] == 13
    for key in ("accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_weighted",
                "expected_calibration_error", "coverage"):
        assert m[key] is None, key
    report = render_report({**m, "rows_per_s": None})
    assert "nothing to score" in report and "accuracy: **" not in report
