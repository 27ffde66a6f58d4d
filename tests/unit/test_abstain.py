import numpy as np
import pyarrow as pa
import pytest

from clsjob.config import AbstainConfig, ClassifyConfig, validate
from clsjob.contract import RESULT_FIELDS
from clsjob.evaluation.abstain import (apply_abstention, pick_distance_threshold, pick_threshold,
                                       scored_labels, settle_rule)
from clsjob.labels import LabelError, LabelSet

LABELS = LabelSet(("billing", "delivery"))


def part(confidence, error=None):
    n = len(confidence)
    error = error or [None] * n
    return pa.table({
        "id": [str(i) for i in range(n)],
        "label": pa.array([None if e else "billing" for e in error], RESULT_FIELDS["label"]),
        "confidence": pa.array(confidence, RESULT_FIELDS["confidence"]),
        "error": pa.array(error, RESULT_FIELDS["error"])})


def test_rows_under_the_threshold_get_the_fallback_label():
    out = apply_abstention(part([0.9, 0.4, 0.5, None], [None, None, None, "text is empty"]),
                           AbstainConfig(label="out_of_scope", below=0.5))
    assert out.column("label").to_pylist() == ["billing", "out_of_scope", "billing", None]
    assert out.column("confidence").to_pylist()[1] == pytest.approx(0.4)  # the model's, kept
    assert out.column("error").to_pylist() == [None, None, None, "text is empty"]
    assert out.schema == part([0.1]).schema


def test_without_a_fallback_label_the_row_says_why_it_has_none():
    out = apply_abstention(part([0.9, 0.3]), AbstainConfig(label=None, below=0.75))
    assert out.column("label").to_pylist() == ["billing", None]
    assert out.column("error").to_pylist() == [None, "below confidence threshold 0.75"]


def test_no_rule_or_no_row_under_it_leaves_the_part_as_it_is():
    table = part([0.9, 0.8])
    assert apply_abstention(table, None) is table
    assert apply_abstention(table, AbstainConfig(label="x", below=0.5)) is table


def test_the_fallback_is_scored_as_one_more_class():
    assert scored_labels(LABELS, AbstainConfig(label="oos", below=0.5)).names == ("billing", "delivery", "oos")
    assert scored_labels(LABELS, AbstainConfig(label=None, below=0.5)) is LABELS
    assert scored_labels(LABELS, None) is LABELS


@pytest.mark.parametrize("seed", range(6))
def test_the_picked_threshold_is_the_highest_within_the_budget(seed):
    rng = np.random.default_rng(seed)
    n = 400
    probs = rng.dirichlet(np.ones(3) * 0.6, size=n)
    probs[: n // 4, :] = probs[0]  # ties, which a threshold cannot split
    gold = np.where(rng.random(n) < 0.75, probs.argmax(axis=1), rng.integers(0, 3, size=n))
    loss = [0.0, 0.02, 0.1][seed % 3]
    below = pick_threshold(probs, gold, loss)
    conf, right = probs.max(axis=1), probs.argmax(axis=1) == gold

    def cost(t):  # right rows given up, as a share of all rows
        return (right & (conf < t)).sum() / n

    assert cost(below) <= loss + 1e-12
    # Brute force over every candidate threshold: none higher keeps within the budget.
    higher = [t for t in np.unique(np.append(conf, np.nextafter(conf.max(), 2))) if t > below]
    assert all(cost(t) > loss for t in higher)


def test_settling_the_rule_on_the_driver():
    rule = AbstainConfig(label="oos", below=None)
    assert settle_rule(rule, {"clsjob_abstain_below": 0.61}, "m").below == 0.61
    assert settle_rule(None, None, "m") is None
    with pytest.raises(LabelError, match="carries no usable clsjob_abstain_below"):
        settle_rule(rule, {}, "m")
    # A model trained with an "out of scope" class of its own may name it as the fallback.
    assert settle_rule(AbstainConfig(label="billing", below=0.5), None, "m").label == "billing"


def test_a_fallback_that_is_a_model_label_is_scored_as_that_label():
    rule = AbstainConfig(label="delivery", below=0.5)
    assert scored_labels(LABELS, rule) is LABELS  # no extra class
    out = apply_abstention(part([0.9, 0.4]), rule)
    assert out.column("label").to_pylist() == ["billing", "delivery"]


def test_the_config_refuses_abstention_without_confidence():
    base = {"input": {"path": "x"}, "output": {"path": "y"}, "labels": ["a", "b"]}
    prompted = {"kind": "vllm_prompt", "model": "m", "prompt": {"mode": "choice"}}
    with pytest.raises(Exception, match="gives no confidence to abstain on"):
        validate({**base, "backend": prompted, "abstain": {"below": 0.5}}, model=ClassifyConfig)
    with pytest.raises(Exception, match="a vllm_prompt back end needs a threshold"):
        validate({**base, "backend": {**prompted, "prompt": {"mode": "score"}}, "abstain": {}},
                 model=ClassifyConfig)
    # A label of the model's own is a fallback like any other (scored as that label).
    assert validate({**base, "backend": {"model": "m"}, "abstain": {"label": "a", "below": 0.5}},
                    model=ClassifyConfig).abstain.label == "a"


def scored_part(ood_score, error=None):
    table = part([0.9] * len(ood_score), error)
    return table.add_column(3, "ood_score", pa.array(ood_score, RESULT_FIELDS["ood_score"]))


def test_by_distance_the_rows_over_the_threshold_abstain():
    rule = AbstainConfig(score="distance", label="out_of_scope", above=0.25)  # exact in float32
    out = apply_abstention(scored_part([0.1, 0.26, 0.25, None], [None, None, None, "text is empty"]), rule)
    assert out.column("label").to_pylist() == ["billing", "out_of_scope", "billing", None]
    assert out.column("ood_score").to_pylist()[1] == pytest.approx(0.26)  # kept, for the reader
    out = apply_abstention(scored_part([0.5]), rule.model_copy(update={"label": None}))
    assert out.column("label").to_pylist() == [None]
    assert out.column("error").to_pylist() == ["over distance threshold 0.25"]


@pytest.mark.parametrize("seed", range(6))
def test_the_picked_distance_threshold_is_the_lowest_within_the_budget(seed):
    rng = np.random.default_rng(seed)
    n = 300
    distance = np.round(rng.gamma(2.0, 0.1, size=n), 2)  # rounded: ties a threshold cannot split
    right = rng.random(n) < 1 / (1 + np.exp(8 * (distance - 0.3)))  # further rows are wrong more
    loss = [0.0, 0.02, 0.1][seed % 3]
    above = pick_distance_threshold(distance, right, loss)

    def cost(t):  # right rows given up (distance over t), as a share of all rows
        return (right & (distance > t)).sum() / n

    assert cost(above) <= loss + 1e-12
    # Brute force over every candidate: none lower keeps within the budget.
    lower = [t for t in np.unique(np.append(distance, distance.min() - 1)) if t < above]
    assert all(cost(t) > loss for t in lower)


def test_settling_a_distance_rule_reads_the_folder():
    rule = AbstainConfig(score="distance", label="oos")
    folder = {"clsjob_distance": {"k": 10, "above": 0.27, "rows": 100}}
    files = ["config.json", "clsjob_distance_index.npy"]
    assert settle_rule(rule, folder, "m", files).above == 0.27
    assert settle_rule(rule.model_copy(update={"above": 0.5}), folder, "m", files).above == 0.5
    with pytest.raises(LabelError, match="backend.model m has no clsjob_distance_index.npy"):
        settle_rule(rule, folder, "m", ["config.json"])
    with pytest.raises(LabelError, match="config.json has no clsjob_distance"):
        settle_rule(rule, {}, "m", files)
    no_eval = {"clsjob_distance": {"k": 10, "above": None, "rows": 100}}
    with pytest.raises(LabelError, match="abstain.above is not set"):
        settle_rule(rule, no_eval, "m", files)


def test_a_mahalanobis_rule_reads_its_own_threshold_and_file():
    rule = AbstainConfig(score="distance", distance="mahalanobis", label="oos")
    folder = {"clsjob_distance": {"k": 10, "above": 0.27, "mahalanobis_above": 17.5, "rows": 100}}
    files = ["config.json", "clsjob_distance_index.npy", "clsjob_distance_gaussians.npz"]
    assert settle_rule(rule, folder, "m", files).above == 17.5
    with pytest.raises(LabelError, match=r"distance \(mahalanobis\): backend.model m has no "
                                         r"clsjob_distance_gaussians.npz"):
        settle_rule(rule, folder, "m", files[:2])
    # Its threshold is not a cosine distance: over 2 is fine; for knn it is refused.
    assert AbstainConfig(score="distance", distance="mahalanobis", above=25).above == 25
    with pytest.raises(Exception, match="abstain.above 25.0: a cosine distance"):
        AbstainConfig(score="distance", above=25)
    with pytest.raises(Exception, match="abstain.distance mahalanobis applies to score: distance"):
        AbstainConfig(distance="mahalanobis")


def test_the_config_keeps_each_threshold_to_its_score_and_distance_to_hf():
    base = {"input": {"path": "x"}, "output": {"path": "y"}, "labels": ["a", "b"]}
    with pytest.raises(Exception, match="score: distance takes abstain.above"):
        AbstainConfig(score="distance", below=0.5)
    with pytest.raises(Exception, match="abstain.above is a distance threshold"):
        AbstainConfig(above=0.5)
    assert validate({**base, "backend": {"model": "m"}, "abstain": {"score": "distance"}},
                    model=ClassifyConfig).abstain.score == "distance"
    with pytest.raises(Exception, match="only backend.kind hf gives \\(not vllm_pool\\)"):
        validate({**base, "backend": {"kind": "vllm_pool", "model": "m"},
                  "abstain": {"score": "distance"}}, model=ClassifyConfig)
