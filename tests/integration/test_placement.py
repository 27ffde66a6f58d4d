"""A job that cannot run says so instead of hanging: a local Ray sized for the job, a refusal
at start naming resources.* and the nodes, and a log line saying what a stalled job waits for."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

from clsjob.config import ClassifyConfig, ResourcesConfig, validate
from clsjob.run.pipeline import run_classify
from clsjob.run.placement import (PlacementError, StallReporter, check_placement, classify_demand)
from helpers import REPO, sample_texts, write_shards
from tiny_models import build_bert_classifier

INTENTS = ["account", "billing", "delivery", "product"]  # the labels the shipped config names


@pytest.mark.slow
def test_shipped_local_eval_config_runs_on_a_local_ray_clsjob_starts(tmp_path):
    """configs/classify-local-eval.yaml asks for an actor of 2 CPUs; with no RAY_ADDRESS on a
    2-core machine, a Ray of 2 logical CPUs left the reader no slot and the job hung."""
    model = build_bert_classifier(tmp_path / "model", INTENTS)
    texts = sample_texts(40)
    write_shards(tmp_path / "in", [{"text": texts, "label": [INTENTS[i % 4] for i in range(40)]}])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A Ray folder of its own: no cluster `ray start` left on this machine is joined.
    with tempfile.TemporaryDirectory(prefix="clsjob-ray-", dir="/tmp") as ray_tmp:
        env["RAY_TMPDIR"] = ray_tmp
        proc = subprocess.run(
            [sys.executable, "-m", "clsjob.cli", "classify",
             "--config", str(REPO / "configs/classify-local-eval.yaml"),
             "--set", f"input.path={tmp_path / 'in'}", "--set", f"backend.model={model}",
             "--set", f"output.path={tmp_path / 'out'}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["rows_in"] == summary["rows_out"] == 40
    if os.cpu_count() == 2:  # a larger machine's Ray has a free CPU anyway
        assert "started a local Ray with 3 logical CPUs on 2 cores" in proc.stderr
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "complete"


def config(model, tmp_path, **resources) -> ClassifyConfig:
    return validate({"input": {"path": str(tmp_path / "in")}, "backend": {"model": str(model)},
                     "resources": resources, "output": {"path": str(tmp_path / "out")}},
                    model=ClassifyConfig)


def test_a_job_the_cluster_cannot_place_fails_at_start(qwen_model, ray_cluster, tmp_path):
    write_shards(tmp_path / "in", [{"text": sample_texts(5)}])
    started = time.monotonic()
    with pytest.raises(PlacementError) as err:
        run_classify(config(qwen_model, tmp_path, gpus_per_actor=1))
    assert time.monotonic() - started < 60  # refused, not waited on
    message = str(err.value)
    assert "only 0 of 1 classifier actors fit, each needing 1 CPU + 1 GPU" in message
    assert "resources.gpus_per_actor" in message and "the cluster has 1 node(s): 4 CPU" in message
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_on_an_autoscaling_cluster_it_waits_with_a_warning(ray_cluster, caplog):
    demand = classify_demand(ResourcesConfig(gpus_per_actor=1))
    with caplog.at_level(logging.WARNING, logger="clsjob"):
        check_placement(demand, autoscaling=True)
    assert "waiting for the autoscaler to add nodes (cluster.autoscaling)" in caplog.text


def test_a_stalled_job_says_what_it_waits_for(ray_cluster, caplog):
    demand = classify_demand(ResourcesConfig(actors=2, cpus_per_actor=1, gpus_per_actor=1))
    with caplog.at_level(logging.WARNING, logger="clsjob"):
        with StallReporter(demand, "classify", after_s=0.3, poll_s=0.05) as stall:
            time.sleep(1.0)
            stall.beat()  # a part landed: quiet again
            reports = caplog.text.count("nothing finished")
            time.sleep(0.2)
    assert reports >= 2  # said, then said again while still stalled
    assert caplog.text.count("nothing finished") == reports
    assert "2 classifier actor(s) asked for 1 CPU + 1 GPU each" in caplog.text
    assert re.search(r"free now: [\d.]+ of 4 CPU, 0 of 0 GPU", caplog.text)


def test_a_finetune_the_cluster_cannot_place_fails_at_start(ray_cluster, tmp_path):
    from clsjob.config import FinetuneConfig
    from clsjob.finetune.train import run_finetune

    cfg = validate({"base_model": "unused", "train": {"path": "unused", "label_column": "y"},
                    "training": {"workers": 2, "use_gpu": True},
                    "output": {"path": str(tmp_path / "adapter")}}, model=FinetuneConfig)
    with pytest.raises(PlacementError, match=r"only 0 of 2 training workers fit, each needing "
                                             r"1 CPU \+ 1 GPU on one node \(training.workers"):
        run_finetune(cfg)
    assert not (tmp_path / "adapter").exists()
