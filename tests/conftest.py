"""Shared fixtures: one local Ray cluster and one set of tiny models per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build_bert_classifier, build_qwen2_classifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # 4 logical CPUs on 2 cores: the shard reader, the classifier actor and the writer must
    # all get a slot (reader and writer are I/O-light).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def qwen_model(tmp_path_factory) -> Path:
    return build_qwen2_classifier(tmp_path_factory.mktemp("qwen2-cls"), LABELS)


@pytest.fixture(scope="session")
def bert_model(tmp_path_factory) -> Path:
    return build_bert_classifier(tmp_path_factory.mktemp("bert-cls"), LABELS)


def sample_texts(n: int, seed: int = 0) -> list[str]:
    """Varied lengths, so padding and length sorting matter."""
    import random

    rng = random.Random(seed)
    words = "the film was a delight dull tedious card payment parcel arrived account".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def write_shards(folder: Path, shards: list[dict]) -> list[Path]:
    """Write one Parquet file per dict of columns; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, columns in enumerate(shards):
        path = folder / f"shard-{i:03d}.parquet"
        pq.write_table(pa.table(columns), path)
        paths.append(path)
    return paths
