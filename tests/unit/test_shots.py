"""Few-shot examples chosen per row (clsjob/shots.py): against a brute-force sort, with ties,
a pool smaller than k, a label short of per_label_min, and the row's own text excluded."""
import numpy as np
import pytest

from clsjob.shots import random_shots, row_seed, similar_shots

LABELS = ["a", "b", "c"]


def brute_force(row, pool, texts, row_text, k):
    """Every allowed pool row ranked by cosine similarity (rounded), ties to the lower index;
    the top k, most similar last."""
    cos = [round(float(np.dot(row, p) / np.linalg.norm(row) / np.linalg.norm(p)), 5) for p in pool]
    allowed = [j for j in range(len(pool)) if texts[j].strip() != row_text.strip()]
    best = sorted(allowed, key=lambda j: (-cos[j], j))[:k]
    return best[::-1]


def test_similar_shots_are_the_nearest_pool_rows_most_similar_last():
    rng = np.random.default_rng(0)
    pool, rows = rng.normal(size=(60, 8)), rng.normal(size=(20, 8))
    texts = [f"pool {j}" for j in range(60)]
    labels = [LABELS[j % 3] for j in range(60)]
    row_texts = [f"row {i}" for i in range(20)]
    got = similar_shots(rows, pool, row_texts, texts, labels, k=8)
    assert got == [brute_force(rows[i], pool, texts, row_texts[i], 8) for i in range(20)]


def test_ties_go_to_the_earlier_pool_row_and_a_small_pool_gives_all_it_has():
    pool = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # rows 0, 1, 3 tie
    got = similar_shots(np.array([[1.0, 0.0]]), pool, ["x"], ["p", "q", "r", "s"], ["a"] * 4, k=2)
    assert got == [[1, 0]]  # the two earliest of the tie, the earliest last (most similar)
    everything = similar_shots(np.array([[1.0, 0.0]]), pool, ["x"], ["p", "q", "r", "s"], ["a"] * 4, k=10)
    assert sorted(everything[0]) == [0, 1, 2, 3] and everything[0][0] == 2  # the least similar first


def test_a_pool_row_with_the_rows_own_text_is_never_its_shot():
    pool = np.eye(3)
    got = similar_shots(np.eye(3)[:1], pool, ["  the same text "], ["the same text", "b", "c"],
                        LABELS, k=3)
    assert 0 not in got[0] and len(got[0]) == 2


def test_per_label_min_puts_every_label_among_the_shots():
    # Label c's only rows are the least similar; without the floor it gets no shot.
    pool = np.array([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 2, dtype=float) + np.arange(8)[:, None] * 1e-3
    labels = ["a", "a", "a", "b", "b", "b", "c", "c"]
    texts = [f"t{j}" for j in range(8)]
    plain = similar_shots(np.array([[1.0, 0.0]]), pool, ["x"], texts, labels, k=4)[0]
    assert {labels[j] for j in plain} == {"a", "b"}
    floored = similar_shots(np.array([[1.0, 0.0]]), pool, ["x"], texts, labels, k=4, per_label_min=1)[0]
    assert len(floored) == 4 and {labels[j] for j in floored} == {"a", "b", "c"}
    # A label with fewer rows than the floor gives what it has.
    short = similar_shots(np.array([[1.0, 0.0]]), pool, ["x"], texts, labels, k=8, per_label_min=3)[0]
    assert sum(labels[j] == "c" for j in short) == 2


def test_random_shots_are_seeded_by_the_row_id_not_its_place():
    texts = [f"pool {j}" for j in range(30)]
    labels = [LABELS[j % 3] for j in range(30)]
    once = random_shots(["r1", "r2"], ["x", "y"], texts, labels, k=5, seed=7)
    swapped = random_shots(["r2", "r1"], ["y", "x"], texts, labels, k=5, seed=7)
    assert once == swapped[::-1] and once[0] != once[1]
    assert random_shots(["r1"], ["x"], texts, labels, k=5, seed=8) != once[:1]
    assert row_seed("r1", 7) == row_seed("r1", 7) != row_seed("r1", 8)
    assert all(len(set(s)) == 5 for s in once)
    assert 3 not in random_shots(["r1"], ["pool 3"], texts, labels, k=29)[0]
