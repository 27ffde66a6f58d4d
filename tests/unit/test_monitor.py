from datetime import date

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from clsjob.config import MonitorConfig, fill_dates
from clsjob.evaluation.metrics import count_rows
from clsjob.evaluation.monitor import compare, distribution, js_divergence, psi, share_under
from clsjob.evaluation.tally import Tally
from clsjob.labels import LabelSet
from clsjob.task import SINGLE_LABEL

LABELS = LabelSet(("a", "b", "c"))


def run(labels: list[str], conf: list[float]) -> dict:
    """A run's distribution from its rows, counted in two parts (as the writer does)."""
    half = len(labels) // 2
    t = Tally(n_labels=3)
    for s in (slice(0, half), slice(half, None)):
        n = len(labels[s])
        t.add(Tally.from_json(count_rows(LABELS, [None] * n, labels[s], conf[s], [None] * n).to_json()))
    return distribution(LABELS, t, SINGLE_LABEL)


@pytest.mark.parametrize("seed", range(4))
def test_psi_and_js_against_scipy_and_the_formula(seed):
    rng = np.random.default_rng(seed)
    p, q = rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(5))
    assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2, rel=1e-9)
    assert psi(p, q) == pytest.approx(sum((a - b) * np.log(a / b) for a, b in zip(p, q)), rel=1e-9)
    assert psi(p, p) == 0 and js_divergence(p, p) == pytest.approx(0, abs=1e-12)
    assert js_divergence(np.array([1.0, 0]), np.array([0, 1.0])) == pytest.approx(1)


def test_distribution_counts_every_labelled_row_gold_or_not():
    d = run(["a"] * 6 + ["b"] * 3 + ["c"], [0.9] * 5 + [0.3] * 5)
    assert d["labels"] == {"a": 6, "b": 3, "c": 1} and d["rows_labelled"] == 10
    assert d["mean_confidence"] == pytest.approx(0.6)
    assert sum(d["confidence_histogram"]) == 10 and d["confidence_histogram"][18] == 5
    assert share_under(d, 0.5) == pytest.approx(0.5) and share_under(d, 0.95) == 1.0


def test_compare_measures_the_shift_and_names_the_limits_passed():
    before = run(["a"] * 50 + ["b"] * 40 + ["c"] * 10, [0.8] * 100)
    same = run(["a"] * 50 + ["b"] * 40 + ["c"] * 10, [0.8] * 100)
    shifted = run(["a"] * 10 + ["b"] * 30 + ["c"] * 60, [0.6] * 60 + [0.4] * 40)
    limits = MonitorConfig(fail_above={"psi": 0.2, "mean_confidence_shift": 0.1})
    calm = compare(same, before, limits)
    assert calm["psi"] == pytest.approx(0) and calm["alerts"] == []
    drift = compare(shifted, before, limits)
    want = psi(np.array([0.1, 0.3, 0.6]), np.array([0.5, 0.4, 0.1]))
    assert drift["psi"] == pytest.approx(want) and drift["psi"] > 0.2
    assert drift["mean_confidence"]["shift"] == pytest.approx(0.52 - 0.8)
    assert drift["share_under"] == {"below": 0.5, "now": pytest.approx(0.4), "baseline": 0.0}
    assert [a.split()[0] for a in drift["alerts"]] == ["psi", "mean_confidence_shift"]
    assert drift["label_shares"]["c"] == {"now": pytest.approx(0.6), "baseline": pytest.approx(0.1)}


def test_a_label_only_one_run_has_is_compared_too():
    drift = compare(run(["a"] * 9 + ["b"], [0.9] * 10), {**run(["a"] * 10, [0.9] * 10),
                                                        "labels": {"a": 10, "gone": 0}}, MonitorConfig())
    assert set(drift["label_shares"]) == {"a", "b", "c", "gone"} and drift["psi"] > 0


def test_date_templates_take_an_offset_in_days():
    out = fill_dates({"monitor": {"baseline": "s3://b/date={date-1:%Y%m%d}/"}, "x": "{date+31}"},
                     date(2026, 3, 1))
    assert out == {"monitor": {"baseline": "s3://b/date=20260228/"}, "x": "2026-04-01"}
