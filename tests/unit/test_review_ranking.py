import numpy as np
import pyarrow as pa
import pytest
from scipy.stats import entropy

from clsjob.config import ReviewConfig
from clsjob.contract import RESULT_FIELDS
from clsjob.evaluation.review import best, part_candidates, review_size, uncertainty
from clsjob.task import SINGLE_LABEL


def written_part(start: int, n: int, seed: int, k: int = 3):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(k), size=n).astype(np.float32)
    probs[::7] = probs[0]  # ties in every strategy, broken by id
    names = ["a", "b", "c"][:k]
    return pa.table({
        "id": [f"row-{start + i:05d}" for i in range(n)],
        "gold": [names[i % k] for i in range(n)],
        "label": [names[j] for j in probs.argmax(axis=1)],
        "confidence": pa.array(probs.max(axis=1), RESULT_FIELDS["confidence"]),
        "probs": pa.array([p.tolist() if i % 11 else None for i, p in enumerate(probs)],  # some errored
                          RESULT_FIELDS["probs"]),
    })


@pytest.mark.parametrize("strategy", ["least_confident", "margin", "entropy"])
def test_uncertainty_against_a_direct_computation(strategy):
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=50)
    want = {"least_confident": 1 - probs.max(axis=1),
            "margin": -np.array([sorted(p)[-1] - sorted(p)[-2] for p in probs]),
            "entropy": entropy(probs, axis=1)}[strategy]
    np.testing.assert_allclose(uncertainty(probs, strategy), want, atol=1e-12)


@pytest.mark.parametrize("strategy", ["least_confident", "margin", "entropy"])
@pytest.mark.parametrize("per_label", [False, True])
def test_merging_the_parts_best_rows_equals_a_full_sort(strategy, per_label):
    rule = ReviewConfig(rows=15, strategy=strategy, per_label=per_label)
    parts = [written_part(100 * s, 90, seed=s) for s in range(5)]
    merged = best((c for p in parts for c in part_candidates(
        p, [f"text {i}" for i in p.column("id").to_pylist()], "id", "gold", rule, 15, SINGLE_LABEL)),
        15, per_label)
    # The full sort over every row that has probabilities.
    rows = [r for p in parts for r in p.to_pylist() if r["probs"] is not None]
    scores = uncertainty(np.array([r["probs"] for r in rows]), strategy)
    order = sorted(range(len(rows)), key=lambda i: (-scores[i], rows[i]["id"]))
    if per_label:
        seen, want = {}, []
        for i in order:
            if seen.get(rows[i]["label"], 0) < 15:
                seen[rows[i]["label"]] = seen.get(rows[i]["label"], 0) + 1
                want.append(rows[i]["id"])
    else:
        want = [rows[i]["id"] for i in order[:15]]
    assert [c["id"] for c in merged] == want
    assert len(merged) == (45 if per_label else 15)
    first = merged[0]
    assert first["text"] == f"text {first['id']}" and "gold" in first and len(first["probs"]) == 3


def test_review_size():
    assert review_size(ReviewConfig(rows=7), 10**9) == 7
    assert review_size(ReviewConfig(fraction=0.01), 1234) == 13
    assert review_size(ReviewConfig(fraction=0.5), 10**9) == 100_000  # bounded: it travels as JSON


def test_exactly_one_size():
    with pytest.raises(ValueError, match="exactly one of rows and fraction"):
        ReviewConfig()
    with pytest.raises(ValueError, match="exactly one of rows and fraction"):
        ReviewConfig(rows=3, fraction=0.1)


def test_a_part_hands_over_only_rows_that_can_be_picked():
    from clsjob.evaluation.review import short_list

    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.2, 0.7, 0.9])
    # The 2 best are among the three tied at 0.9: all three kept, for the id to decide.
    assert short_list(scores, list("abababa"), 2, per_label=False).tolist() == [1, 3, 6]
    # Per label: a -> 0.1, 0.5, 0.2, 0.9 (positions 0, 2, 4, 6); b -> 0.9, 0.9, 0.7.
    assert short_list(scores, list("abababa"), 2, per_label=True).tolist() == [1, 2, 3, 6]
