"""Few-shot examples chosen per row from a labelled pool (pure numpy): a row's shots are the
`k` pool rows most similar to it (select: similar), or `k` drawn at random with a seed of its
own (select: random), instead of one fixed list for every row.

Every choice is a function of the row and the pool alone, so a rerun, a resumed run or
another actor writes the same prompt for the same row:
- similarities are rounded (SIMILARITY_DECIMALS) before they are ranked, so embeddings that
  differ in their last bits between CPUs do not reorder near-ties, and ties go to the pool row
  that comes first;
- a random draw is seeded by the row's id, not by the order rows arrive in;
- a pool row whose text is the row's own is never its shot: labelling the pool itself must
  not put the answer in the prompt.
Shots come in ascending similarity, the most similar last, next to the row."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from clsjob.evaluation.distance import normalized

SIMILARITY_DECIMALS = 5


@dataclass(frozen=True)
class Pool:
    """The labelled rows shots are drawn from, as the driver read and checked them."""
    texts: tuple[str, ...]
    labels: tuple[str, ...]

    def fingerprint(self) -> str:
        """The pool's content: a changed pool is different work (resume.work_hash)."""
        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels):
            digest.update(json.dumps([text, label]).encode())
        return digest.hexdigest()[:16]


def fixed_shots(pool: Pool, k: int, per_label_min: int = 0) -> list[int]:
    """select: fixed: the pool's first k rows (per_label_min of each label among them), in
    pool order: the same shots for every row."""
    return sorted(take(np.arange(len(pool.texts)), pool.labels, k, per_label_min))


def same_text(row_texts: Sequence[str], pool_texts: Sequence[str]) -> np.ndarray:
    """rows x pool booleans: the pool row's text is the row's (surrounding spaces aside)."""
    where: dict[str, list[int]] = {}
    for j, text in enumerate(pool_texts):
        where.setdefault(text.strip(), []).append(j)
    out = np.zeros((len(row_texts), len(pool_texts)), dtype=bool)
    for i, text in enumerate(row_texts):
        out[i, where.get(text.strip(), [])] = True
    return out


def take(order: np.ndarray, pool_labels: Sequence[str], k: int, per_label_min: int) -> list[int]:
    """The first `k` pool rows of `order` (best first), the first `per_label_min` of each
    label in it among them (all of a label's rows where it has fewer): a small label set then
    has every label among the shots. (The config keeps per_label_min x labels within k.)"""
    chosen: list[int] = []
    if per_label_min:
        seen: dict[str, int] = {}
        for j in order:
            label = pool_labels[j]
            if seen.get(label, 0) < per_label_min:
                seen[label] = seen.get(label, 0) + 1
                chosen.append(int(j))
    taken = set(chosen)
    for j in order:
        if len(chosen) >= k:
            break
        if int(j) not in taken:
            chosen.append(int(j))
    return chosen


def similar_shots(row_vectors: np.ndarray, pool_vectors: np.ndarray, row_texts: Sequence[str],
                  pool_texts: Sequence[str], pool_labels: Sequence[str], k: int,
                  per_label_min: int = 0) -> list[list[int]]:
    """Each row's shots: pool indices, least similar first and most similar last."""
    sims = np.round(normalized(row_vectors) @ normalized(pool_vectors).T, SIMILARITY_DECIMALS)
    excluded = same_text(row_texts, pool_texts)
    index = np.arange(len(pool_texts))
    shots = []
    for i in range(len(row_texts)):
        allowed = index[~excluded[i]]
        # Most similar first; ties to the earlier pool row (lexsort sorts by its last key first).
        order = allowed[np.lexsort((allowed, -sims[i, allowed]))]
        chosen = take(order, pool_labels, k, per_label_min)
        shots.append(sorted(chosen, key=lambda j: (sims[i, j], -j)))
    return shots


def row_seed(row_id: str, seed: int) -> int:
    """A draw's seed from the row's id: the same for the row on every run and actor."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little")


def random_shots(row_ids: Sequence[str], row_texts: Sequence[str], pool_texts: Sequence[str],
                 pool_labels: Sequence[str], k: int, per_label_min: int = 0,
                 seed: int = 0) -> list[list[int]]:
    """Each row's shots drawn at random from the pool (its own text excluded); the first
    drawn comes last, where a similar row's best would."""
    excluded = same_text(row_texts, pool_texts)
    index = np.arange(len(pool_texts))
    shots = []
    for i, row_id in enumerate(row_ids):
        allowed = index[~excluded[i]]
        order = np.random.default_rng(row_seed(row_id, seed)).permutation(allowed)
        chosen = take(order, pool_labels, k, per_label_min)
        rank = {j: r for r, j in enumerate(order.tolist())}
        shots.append(sorted(chosen, key=lambda j: -rank[j]))
    return shots


def choose_shots(select: str, pool: Pool, texts: Sequence[str], row_ids: Sequence[str], k: int,
                 per_label_min: int = 0, seed: int = 0, row_vectors: np.ndarray | None = None,
                 pool_vectors: np.ndarray | None = None) -> list[list[int]]:
    """Each row's shots as pool indices by `select` (similar: from the embeddings given;
    random: seeded by `row_ids`): a function of the row and the pool alone."""
    if select == "similar":
        return similar_shots(row_vectors, pool_vectors, texts, pool.texts, pool.labels, k,
                             per_label_min)
    if select == "random":
        return random_shots(row_ids, texts, pool.texts, pool.labels, k, per_label_min, seed)
    raise ValueError(f"select {select!r} shares its shots: they are the prompt's examples")

