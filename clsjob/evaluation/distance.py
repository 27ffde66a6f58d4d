"""How far a row is from what a model was trained on (pure numpy): the scores `abstain.score:
distance` abstains on, for rows that fit none of the labels.

- kNN: the cosine distance from a row's embedding to its k-th nearest training row (Sun et al.,
  "Out-of-Distribution Detection with Deep Nearest Neighbors", 2022). The training side is an
  index: a class-balanced sample of at most `per_class` rows a label (`balanced_sample`), unit
  length, float16 (what the model folder keeps), so that scoring is one matrix product and
  the index stays small for any training set.
- Mahalanobis: the distance to the nearest class mean under one covariance shared by the
  classes (Lee et al., 2018), shrunk towards its diagonal so that a few hundred rows in a
  768-wide space still give an invertible matrix.

Higher is further: more likely out of scope."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Mahalanobis: the share of the covariance's mean variance added on its diagonal.
SHRINKAGE = 0.1


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero): a dot product is then the cosine."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def balanced_sample(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Row numbers of at most `per_class` rows of each label (a seeded draw; a label with
    fewer keeps them all), in label order then row order: the rows an index keeps, chosen
    before any is embedded."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    keep = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        keep.extend(rows if len(rows) <= per_class else np.sort(rng.choice(rows, per_class, replace=False)))
    return np.array(keep, dtype=np.int64)


def knn_index(embeddings: np.ndarray) -> np.ndarray:
    """The index kNN scores against: the rows at unit length, float16 (what the model folder
    keeps: half the bytes, and cosines within 1e-3)."""
    return normalized(embeddings).astype(np.float16)


def knn_distance(queries: np.ndarray, index: np.ndarray, k: int) -> np.ndarray:
    """1 - the cosine similarity of each query to its k-th most similar index row (the
    nearest when k exceeds the index)."""
    sims = normalized(queries) @ index.astype(np.float32).T
    k = min(k, index.shape[0])
    kth = np.partition(sims, sims.shape[1] - k, axis=1)[:, sims.shape[1] - k]
    return (1.0 - kth).astype(np.float64)


@dataclass(frozen=True)
class ClassGaussians:
    """Class means and the inverse of their shared (shrunk) covariance."""
    means: np.ndarray  # labels x dim
    precision: np.ndarray  # dim x dim

    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: np.ndarray) -> "ClassGaussians":
        x, labels = np.asarray(embeddings, dtype=np.float64), np.asarray(labels)
        classes = np.unique(labels)
        means = np.stack([x[labels == c].mean(axis=0) for c in classes])
        centred = x - means[np.searchsorted(classes, labels)]
        cov = centred.T @ centred / len(x)
        cov += SHRINKAGE * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
        return cls(means, np.linalg.inv(cov))

    def distance(self, queries: np.ndarray) -> np.ndarray:
        """The Mahalanobis distance of each query to its nearest class mean."""
        q = np.asarray(queries, dtype=np.float64)
        # (q - m)' P (q - m) expanded, so no rows x classes x dim array is ever built.
        qp = q @ self.precision
        squared = ((qp * q).sum(axis=1)[:, None] - 2 * qp @ self.means.T
                   + ((self.means @ self.precision) * self.means).sum(axis=1)[None, :])
        return np.sqrt(np.maximum(squared.min(axis=1), 0.0))
