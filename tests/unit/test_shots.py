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


def test_a_rows_shots_do_not_depend_on_the_chunk_or_actor_it_comes_in():
    """The rendered prompt is a function of the row and the pool: the same shots whether a row
    comes alone, first or last in a chunk (rerun, resume, another actor)."""
    from clsjob.shots import Pool, choose_shots

    rng = np.random.default_rng(4)
    pool = Pool(tuple(f"pool {j}" for j in range(30)), tuple(LABELS[j % 3] for j in range(30)))
    pool_vectors, rows = rng.normal(size=(30, 6)), rng.normal(size=(10, 6))
    texts, ids = [f"row {i}" for i in range(10)], [f"shard-0:{i}" for i in range(10)]
    for select in ("similar", "random"):
        whole = choose_shots(select, pool, texts, ids, 4, 1, 7, rows, pool_vectors)
        order = [9, 3, 0, 5, 1, 8, 2, 7, 4, 6]
        shuffled = choose_shots(select, pool, [texts[i] for i in order], [ids[i] for i in order],
                                4, 1, 7, rows[order], pool_vectors)
        assert [shuffled[order.index(i)] for i in range(10)] == whole
        alone = [choose_shots(select, pool, [texts[i]], [ids[i]], 4, 1, 7, rows[[i]], pool_vectors)[0]
                 for i in range(10)]
        assert alone == whole
        assert all({pool.labels[j] for j in shots} == set(LABELS) for shots in whole)  # per_label_min 1
    # Another seed, other random shots.
    assert choose_shots("random", pool, texts, ids, 4, seed=8) != choose_shots("random", pool, texts, ids, 4, seed=7)


def test_select_fixed_takes_the_pools_first_rows_with_every_label():
    from clsjob.shots import Pool, fixed_shots

    pool = Pool(("a1", "a2", "a3", "b1", "c1"), ("a", "a", "a", "b", "c"))
    assert fixed_shots(pool, 3) == [0, 1, 2]
    assert fixed_shots(pool, 3, per_label_min=1) == [0, 3, 4]


def test_the_pools_fingerprint_follows_its_content():
    from clsjob.shots import Pool

    a = Pool(("x", "y"), ("a", "b"))
    assert a.fingerprint() == Pool(("x", "y"), ("a", "b")).fingerprint()
    assert a.fingerprint() != Pool(("x", "y"), ("a", "a")).fingerprint()
    assert a.fingerprint() != Pool(("x", "y "), ("a", "b")).fingerprint()


def test_the_pool_is_checked_on_the_driver_naming_the_file_row_and_setting(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clsjob.backends import ModelError
    from clsjob.backends.vllm_prompt import prompt_examples
    from clsjob.config import PromptConfig, ShotsConfig, StorageConfig
    from clsjob.labels import LabelError, LabelSet

    labels = LabelSet(tuple(LABELS))

    def examples(rows: dict, **shots):
        path = tmp_path / "pool.parquet"
        pq.write_table(pa.table(rows), path)
        prompt = PromptConfig(shots=ShotsConfig(pool=str(path), **{"select": "random", **shots}))
        return prompt_examples(prompt, labels, StorageConfig())

    good = {"text": ["x", "y", "z", "w"], "label": ["a", "b", "c", "a"]}
    shared, pool = examples(good)
    assert shared == [] and pool.texts == ("x", "y", "z", "w")
    shared, _ = examples(good, select="fixed", k=2, per_label_min=0)
    assert [(ex.text, ex.label) for ex in shared] == [("x", "a"), ("y", "b")]
    with pytest.raises(LabelError, match=r"pool.parquet has labels not in the label set: \['d'\]"):
        examples({"text": ["x", "y"], "label": ["a", "d"]})
    with pytest.raises(ModelError, match=r"pool.parquet row 1: text is empty"):
        examples({"text": ["x", " "], "label": ["a", "b"]})
    with pytest.raises(LabelError, match=r"row 0: label is None"):
        examples({"text": ["x"], "label": pa.array([None], pa.string())})
    with pytest.raises(ModelError, match=r"backend.prompt.shots.pool: cannot read \['text', 'gold'\]"):
        examples(good, label_column="gold")
    with pytest.raises(LabelError, match=r"per_label_min 2 x 3 labels is more than backend.prompt.shots.k 4"):
        examples(good, k=4, per_label_min=2)


def test_shots_settings_that_cannot_work_are_refused_naming_the_key(tmp_path):
    from clsjob.config import ClassifyConfig, ConfigError, validate

    def load(shots: dict, **extra):
        return validate({"input": {"path": "in/"}, "labels": LABELS, "output": {"path": "out/"},
                         "backend": {"kind": "vllm_prompt", "model": "m",
                                     "prompt": {"shots": {"pool": "p.parquet", **shots},
                                                **extra.pop("prompt", {})}}, **extra},
                        model=ClassifyConfig)

    assert load({"embedder": "e"}).backend.prompt.shots.select == "similar"
    with pytest.raises(ConfigError, match="shots.select similar needs shots.embedder"):
        load({})
    with pytest.raises(ConfigError, match="shots.embedder is for select: similar, not random"):
        load({"select": "random", "embedder": "e"})
    with pytest.raises(ConfigError, match="leave out backend.prompt.examples and examples_path"):
        load({"select": "random"}, prompt={"examples_path": "x.parquet"})
    with pytest.raises(ConfigError, match="backend.prompt.shots is not supported with task: multi_label"):
        load({"select": "random"}, prompt={"mode": "score"}, task="multi_label")


def test_the_pools_content_is_part_of_the_work():
    from clsjob.config import ClassifyConfig, validate
    from clsjob.run.resume import work_hash

    cfg = validate({"input": {"path": "in/"}, "labels": LABELS, "output": {"path": "out/"},
                    "backend": {"kind": "vllm_prompt", "model": "m",
                                "prompt": {"shots": {"pool": "p.parquet", "select": "random"}}}},
                   model=ClassifyConfig)
    one = work_hash(cfg, (("backend.prompt.shots.pool", "aaaa"),))
    assert one == work_hash(cfg, (("backend.prompt.shots.pool", "aaaa"),))
    assert one != work_hash(cfg, (("backend.prompt.shots.pool", "bbbb"),)) != work_hash(cfg)
