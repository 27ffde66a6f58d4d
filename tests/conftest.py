"""Shared fixtures: one local Ray cluster and one set of tiny models per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import LABELS, TEST_AWS_ENV
from tiny_models import build_bert_classifier, build_qwen2_classifier


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from clsjob.run.placement import OWN_CLUSTER

    # 4 logical CPUs on 2 cores: the shard reader, the classifier actor and the writer must
    # all get a slot (reader and writer are I/O-light). OWN_CLUSTER: Ray Train's cleaner
    # must not ask another Ray on the machine (a test's `ray start`) about this one's runs.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": TEST_AWS_ENV, **OWN_CLUSTER})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def qwen_model(tmp_path_factory) -> Path:
    return build_qwen2_classifier(tmp_path_factory.mktemp("qwen2-cls"), LABELS)


@pytest.fixture(scope="session")
def bert_model(tmp_path_factory) -> Path:
    return build_bert_classifier(tmp_path_factory.mktemp("bert-cls"), LABELS)
