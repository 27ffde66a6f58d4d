import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import log_loss

from clsjob.evaluation.calibration import calibrate, ece, fit_temperature, nll
from clsjob.model_folder import rescale_probs, scaled_softmax
from clsjob.model_folder import temperature as model_temperature


def overconfident_rows(temperature: float, n: int = 20_000, k: int = 5, seed: int = 0):
    """Gold labels drawn from softmax(z), and a model that reports z * temperature: its
    calibrating temperature is `temperature` by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, k))
    probs = softmax(z, axis=1)
    gold = (rng.random((n, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    return z * temperature, gold


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5, 6.0])
def test_the_fit_recovers_a_known_temperature(temperature):
    logits, gold = overconfident_rows(temperature)
    assert fit_temperature(logits, gold) == pytest.approx(temperature, rel=0.04)


def test_the_fit_is_the_minimum_of_the_nll():
    logits, gold = overconfident_rows(3.0, n=3_000, seed=1)
    best = fit_temperature(logits, gold)
    grid = np.linspace(0.5, 8, 400)
    losses = [nll(scaled_softmax(logits, t), gold) for t in grid]
    assert nll(scaled_softmax(logits, best), gold) <= min(losses) + 1e-9
    assert best == pytest.approx(grid[int(np.argmin(losses))], abs=0.02)


def test_nll_and_ece_match_a_direct_computation():
    logits, gold = overconfident_rows(2.0, n=2_000, seed=2)
    probs = scaled_softmax(logits, 1.0)
    assert nll(probs, gold) == pytest.approx(log_loss(gold, probs, labels=range(5)), rel=1e-9)
    # ECE row by row: 15 equal-width bins of the top probability, right-closed.
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == gold
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        rows = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if rows.any():
            total += rows.sum() * abs(correct[rows].mean() - conf[rows].mean())
    assert ece(probs, gold) == pytest.approx(total / len(gold), rel=1e-9)


def test_calibration_lowers_ece_and_nll_and_keeps_accuracy():
    logits, gold = overconfident_rows(4.0, seed=3)
    out = calibrate(logits, gold)
    assert out["temperature"] == pytest.approx(4.0, rel=0.04) and out["rows"] == len(gold)
    assert out["ece_after"] < 0.02 < out["ece_before"]
    assert out["nll_after"] < out["nll_before"]
    after = scaled_softmax(logits, out["temperature"])
    assert (after.argmax(axis=1) == logits.argmax(axis=1)).all()
    assert out["accuracy"] == pytest.approx((logits.argmax(axis=1) == gold).mean())


def test_rescaled_probabilities_equal_the_scaled_softmax_of_the_logits():
    # What vllm_pool does (it gets probabilities, not logits) against what hf does.
    logits, _ = overconfident_rows(1.0, n=500, seed=4)
    probs = softmax(logits, axis=1).astype(np.float32)
    for t in (0.3, 1.7, 9.0):
        assert np.allclose(rescale_probs(probs, t), scaled_softmax(logits, t), atol=1e-6)
    assert rescale_probs(probs, 1.0) is probs


def test_a_model_folder_temperature_is_checked():
    assert model_temperature({}, "m") == 1.0
    assert model_temperature({"clsjob_temperature": 1.5}, "m") == 1.5
    for bad in (0, -2.0, "2", float("inf"), True):
        with pytest.raises(ValueError, match="m: config.json's clsjob_temperature"):
            model_temperature({"clsjob_temperature": bad}, "m")


def test_no_rows_is_an_error_not_a_temperature():
    with pytest.raises(ValueError, match="at least one labelled row"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_a_fit_that_runs_off_stops_at_a_bound_and_says_so():
    logits, gold = overconfident_rows(1.0, n=2_000, seed=5)
    right = calibrate(logits, logits.argmax(axis=1))  # every row right: sharper is always better
    assert right["at_bound"] and right["temperature"] == pytest.approx(0.05, rel=1e-3)
    rng = np.random.default_rng(6)
    noise = calibrate(logits, rng.integers(0, 5, size=len(logits)))  # answers unrelated to gold
    assert noise["at_bound"] and noise["temperature"] == pytest.approx(100, rel=1e-3)
    assert not calibrate(*overconfident_rows(2.0, seed=7))["at_bound"]
