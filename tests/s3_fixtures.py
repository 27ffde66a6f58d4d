"""A real S3 endpoint for tests: moto's server on 127.0.0.1, with dummy credentials in the
environment of the test process and of the Ray workers, and input shards uploaded. Test
modules import the fixtures they use; each module gets a server of its own."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pyarrow as pa
import pytest
import ray

from helpers import LABELS, TEST_AWS_ENV, sample_texts, write_shards

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "clsjob-test"
AWS_ENV = TEST_AWS_ENV
# Anything in the environment that could send botocore elsewhere or to other credentials.
AWS_UNSET = ["AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
             "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
             "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ROLE_ARN",
             "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]
SHARD_ROWS = [40, 35, 30]
# (shard, row) -> a text the prepare stage must turn into an error row. Row 16 of shard 1 is
# the first row of its second chunk (test_s3.py's rows_per_part: 16).
BAD_TEXTS = {(0, 3): None, (1, 16): "", (2, 29): "  "}


@dataclass(frozen=True)
class S3:
    endpoint: str
    client: object  # boto3 S3 client with the test credentials

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def aws_env():
    """Dummy credentials in os.environ for this module; yields the values they replaced."""
    saved = {name: os.environ.get(name) for name in [*AWS_ENV, *AWS_UNSET]}
    with pytest.MonkeyPatch.context() as mp:
        for name in AWS_UNSET:
            mp.delenv(name, raising=False)
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        yield saved


@pytest.fixture(scope="module")
def s3(aws_env, tmp_path_factory) -> S3:
    """A moto S3 server with the input shards uploaded."""
    # port=0: the OS picks a free port and the server reports it, so no race for a port.
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        for path in write_shards(tmp_path_factory.mktemp("s3-in"), shard_columns()):
            client.upload_file(str(path), BUCKET, f"in/{path.name}")
        # A marker file as Spark and others leave it: a folder listing must skip it.
        client.put_object(Bucket=BUCKET, Key="in/_SUCCESS", Body=b"")
        yield S3(endpoint, client)
    finally:
        server.stop()


def shard_columns() -> list[dict]:
    rng = random.Random(1)
    shards = []
    for i, n in enumerate(SHARD_ROWS):
        texts = sample_texts(n, seed=i)
        for (shard, row), bad in BAD_TEXTS.items():
            if shard == i:
                texts[row] = bad
        shards.append({"text": pa.array(texts, pa.string()),
                       "label": [rng.choice(LABELS) for _ in range(n)]})
    return shards


@pytest.fixture(scope="module")
def ray_with_aws_env(ray_cluster, s3):
    """Ray whose workers see the test credentials. A worker's environment is fixed when Ray
    starts (variables the driver sets later never reach it), so the session cluster carries
    them in its runtime_env (tests/conftest.py); this checks that it really does."""
    assert ray_cluster.get(_worker_env.remote(list(AWS_ENV))) == AWS_ENV
    return ray_cluster


@ray.remote
def _worker_env(names: list[str]) -> dict:
    return {n: os.environ.get(n) for n in names}
