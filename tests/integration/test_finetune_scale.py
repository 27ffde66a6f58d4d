"""Fine-tuning as on a cluster, on CPU: two Ray Train workers (gloo, DDP) on a tiny Qwen2,
QLoRA (bitsandbytes NF4 trains on CPU) and plain LoRA, checkpoints on a moto S3 server, a
worker killed mid-training, and a killed driver whose rerun resumes from the checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from clsjob.config import FinetuneConfig, validate
from clsjob.finetune.train import SUMMARY, run_finetune
from helpers import REPO, TEST_AWS_ENV, cluster_processes, write_shards
from test_finetune import task_rows
from tiny_models import build_qwen2_classifier

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")
pytestmark = pytest.mark.slow
BUCKET = "clsjob-ckpt"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the reported checkpoints


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-scale")
    base = build_qwen2_classifier(root / "base", ["unused"], causal_lm=True)
    write_shards(root / "train", [task_rows(96, 0), task_rows(96, 1)])
    write_shards(root / "eval", [task_rows(48, 2)])
    return root, base


def finetune_config(root, base, out, **training) -> dict:
    return {"base_model": str(base),
            "train": {"path": str(root / "train"), "label_column": "label"},
            "eval": {"path": str(root / "eval"), "label_column": "label"},
            "training": {"epochs": 3, "learning_rate": 3e-3, "batch_size": 16, "max_length": 32,
                         "lora_r": 8, "lora_alpha": 16, "workers": 2, **training},
            "output": {"path": str(out)}}


def train_workers() -> list[psutil.Process]:
    return cluster_processes("RayTrainWorker")


def resume_point_recorded(snapshot: bytes) -> bool:
    return bool(json.loads(snapshot).get("latest_checkpoint_result"))


def wait_until(what, check, timeout=240):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server; the test process gets the credentials the session cluster's
    workers already have (tests/conftest.py)."""
    for name, value in TEST_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    server.stop()


def test_qlora_on_two_workers_survives_a_killed_worker_with_s3_checkpoints(data, s3, ray_cluster, tmp_path):
    root, base = data
    endpoint, client = s3
    # 5 epochs: the kill at the first checkpoint must come well before training ends, even
    # on a loaded machine.
    cfg = finetune_config(root, base, tmp_path / "adapter", quantization="nf4", max_failures=2,
                          epochs=5)
    cfg["output"]["storage_path"] = f"s3://{BUCKET}/runs"
    cfg["storage"] = {"endpoint_url": endpoint}
    cfg = validate(cfg, model=FinetuneConfig)

    def checkpoints() -> list[str]:
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix="runs/").get("Contents", [])
        return sorted({o["Key"].split("/")[2] for o in listed
                       if o["Key"].count("/") > 2 and o["Key"].split("/")[2].startswith("checkpoint_")})

    killed = []

    def registered() -> bool:
        # A checkpoint folder appears as its upload starts; it counts once Ray Train has
        # recorded it in the run's snapshot, and only then is it a resume point.
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix="runs/").get("Contents", [])
        snapshot = [o["Key"] for o in listed if o["Key"].endswith(SNAPSHOT)]
        return bool(snapshot) and resume_point_recorded(
            client.get_object(Bucket=BUCKET, Key=snapshot[0])["Body"].read())

    def kill_a_worker_after_the_first_checkpoint():
        wait_until("the first checkpoint in S3", registered)
        victim = train_workers()[-1]
        victim.send_signal(signal.SIGKILL)
        killed.append(victim.pid)

    import threading
    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    summary = run_finetune(cfg)
    killer.join(timeout=5)

    assert killed, "no worker was killed: the test did not test anything"
    assert summary["quantization"] == "nf4" and summary["workers"] == 2
    assert summary["resumed_from_checkpoint"] is True  # the restarted workers went on from S3
    assert len(checkpoints()) >= 1
    assert summary["final_eval"]["eval_accuracy"] >= 0.9
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["r"] == 8
    assert summary["peak_memory_gib"] > 0


def test_rerun_after_a_killed_driver_resumes_from_the_checkpoint(data, ray_cluster, tmp_path):
    root, base = data
    out = tmp_path / "adapter"
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump(finetune_config(root, base, out, quantization="none",
                                                     class_weights="balanced")))
    storage = out / "ray"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "clsjob.cli", "finetune", "--config", str(config)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until("the first checkpoint", lambda: any(
            resume_point_recorded(p.read_bytes()) for p in storage.glob(f"*/{SNAPSHOT}")))
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert not (out / SUMMARY).exists()
    # The killed driver's job takes its training workers with it.
    wait_until("the old workers to exit", lambda: not train_workers(), timeout=240)

    cfg = validate(yaml.safe_load(config.read_text()), model=FinetuneConfig)
    summary = run_finetune(cfg)
    assert summary["resumed_from_checkpoint"] is True
    assert summary["class_weights"] is not None and len(summary["class_weights"]) == 3
    assert summary["final_eval"]["eval_accuracy"] >= 0.9
    # Every epoch was evaluated once across the two attempts' logs: the resumed trainer
    # carries the first attempt's history forward.
    assert [round(e["epoch"]) for e in summary["epochs"]] == [1, 2, 3]
