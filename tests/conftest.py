"""Shared fixtures: one local Ray cluster and one set of tiny models per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import LABELS, TEST_AWS_ENV
from ray_nodes import free_port
from tiny_models import build_bert_classifier, build_qwen2_classifier


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from clsjob.run.placement import OWN_CLUSTER

    # 4 logical CPUs on 2 cores: the shard reader, the classifier actor and the writer must
    # all get a slot (reader and writer are I/O-light). OWN_CLUSTER: Ray Train's cleaner
    # must not ask another Ray on the machine (a test's `ray start`) about this one's runs.
    # It asks through the state API, which is the dashboard's: without a dashboard of its own
    # it reaches another Ray's on the default port (a benchmark's), hears "no such actor" and
    # kills a live fine-tune. A dashboard of its own, on a port nobody else holds.
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=free_port(), log_to_driver=False,
             runtime_env={"env_vars": TEST_AWS_ENV, **OWN_CLUSTER})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def qwen_model(tmp_path_factory) -> Path:
    return build_qwen2_classifier(tmp_path_factory.mktemp("qwen2-cls"), LABELS)


@pytest.fixture(scope="session")
def bert_model(tmp_path_factory) -> Path:
    return build_bert_classifier(tmp_path_factory.mktemp("bert-cls"), LABELS)
