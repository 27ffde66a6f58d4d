"""Out-of-scope scores (clsjob/evaluation/distance.py) against brute-force computations."""
import numpy as np
import pytest

from clsjob.evaluation.distance import ClassGaussians, balanced_sample, knn_distance, knn_index


def test_the_knn_index_keeps_a_capped_class_balanced_sample_at_unit_length():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6))
    labels = np.array([0] * 40 + [1] * 7 + [2] * 3)
    rows = balanced_sample(labels, per_class=5, seed=1)
    assert [int((labels[rows] == c).sum()) for c in (0, 1, 2)] == [5, 5, 3]  # a small label keeps all
    assert list(rows[-3:]) == [47, 48, 49] and len(set(rows)) == 13
    index = knn_index(x[rows])
    assert index.dtype == np.float16 and index.shape == (13, 6)
    np.testing.assert_allclose(np.linalg.norm(index.astype(np.float32), axis=1), 1.0, atol=2e-3)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    # Every kept row is one of its label's rows, and a small label keeps them all.
    for row in index[-3:].astype(np.float32):
        assert np.abs(unit[47:] - row).max(axis=1).min() < 2e-3
    assert np.array_equal(rows, balanced_sample(labels, per_class=5, seed=1))  # seeded


@pytest.mark.parametrize("k", [1, 3, 50])
def test_knn_distance_is_the_cosine_distance_to_the_kth_nearest(k):
    rng = np.random.default_rng(k)
    train, queries = rng.normal(size=(20, 8)), rng.normal(size=(7, 8))
    index = knn_index(train)
    got = knn_distance(queries, index, k)
    unit = index.astype(np.float64)
    for q, d in zip(queries, got):
        sims = sorted((unit @ q / np.linalg.norm(q)).tolist(), reverse=True)
        assert d == pytest.approx(1 - sims[min(k, 20) - 1], abs=1e-5)
    # A training row itself is at distance 0 from its nearest neighbour.
    assert knn_distance(train[:3], index, 1) == pytest.approx(np.zeros(3), abs=2e-3)


def test_mahalanobis_is_the_distance_to_the_nearest_class_mean_under_the_shared_covariance():
    rng = np.random.default_rng(3)
    means = np.array([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    labels = np.repeat([0, 1], 200)
    x = means[labels] + rng.normal(size=(400, 3)) * np.array([1.0, 3.0, 0.5])
    g = ClassGaussians.fit(x, labels)
    np.testing.assert_allclose(g.means, [x[:200].mean(0), x[200:].mean(0)])
    centred = x - g.means[labels]
    cov = centred.T @ centred / 400
    cov += 0.1 * np.trace(cov) / 3 * np.eye(3)
    queries = rng.normal(size=(5, 3)) * 4
    want = [min(np.sqrt((q - m) @ np.linalg.inv(cov) @ (q - m)) for m in g.means) for q in queries]
    np.testing.assert_allclose(g.distance(queries), want, rtol=1e-9)
    # Along the wide axis a step costs less than along the narrow one.
    near, far = g.distance(np.array([[0.0, 3.0, 0.0], [0.0, 0.0, 3.0]]))
    assert near < far


def test_the_hf_back_end_scores_by_the_saved_class_means_as_fitted(tmp_path):
    """abstain.distance: mahalanobis reads the means and precision a fine-tune saved (float32)
    and scores a row's unit-length representation as ClassGaussians does in float64."""
    from transformers import PretrainedConfig

    from clsjob.backends import ModelError
    from clsjob.backends.hf import load_ood_score
    from clsjob.evaluation.distance import normalized

    rng = np.random.default_rng(5)
    labels = np.repeat([0, 1, 2], 40)
    train = rng.normal(size=(120, 6)) + np.eye(3, 6)[labels] * 4
    fitted = ClassGaussians.fit(normalized(train), labels)
    np.savez(tmp_path / "clsjob_distance_gaussians.npz", means=fitted.means.astype(np.float32),
             precision=fitted.precision.astype(np.float32))
    config = PretrainedConfig(clsjob_distance={"k": 5, "above": 0.3, "mahalanobis_above": 3.0})
    score = load_ood_score(str(tmp_path), config, "mahalanobis")
    queries = rng.normal(size=(7, 6)) * 3
    np.testing.assert_allclose(score(queries), fitted.distance(normalized(queries)), rtol=1e-4)
    assert score(np.zeros((0, 6))).shape == (0,)
    with pytest.raises(ModelError, match="holds 6-wide rows, the model .* gives 4: it is from another model"):
        score(queries[:, :4])
