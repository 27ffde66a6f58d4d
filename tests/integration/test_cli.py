"""The command line: configs from YAML with --set overrides, clear errors, JSON summaries."""
import json
import os
import subprocess
import sys

import yaml

from clsjob.cli import main
from helpers import REPO, sample_texts, write_shards


def test_bad_config_exits_2_naming_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"input": {"path": "x", "txt_column": "t"},
                                    "backend": {"model": "m"}, "output": {"path": "o"}}))
    proc = subprocess.run([sys.executable, "-m", "clsjob.cli", "classify", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "input.txt_column: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_classify_then_evaluate_from_the_command_line(qwen_model, ray_cluster, tmp_path, capsys):
    write_shards(tmp_path / "in", [{"text": sample_texts(30) + [""], "y": ["neutral"] * 31}])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"input": {"path": str(tmp_path / "in")},
                                    "backend": {"model": str(qwen_model)},
                                    "output": {"path": str(tmp_path / "wrong")}}))
    code = main(["classify", "--config", str(path), "--set", "input.label_column=y",
                 "--set", f"output.path={tmp_path / 'out'}", "--set", "output.rows_per_part=8"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_in"] == summary["rows_out"] == 31 and summary["rows_errored"] == 1
    assert not (tmp_path / "wrong").exists()
    assert len(list((tmp_path / "out").glob("*.parquet"))) == 4  # 31 rows in parts of 8

    (tmp_path / "out" / "_metrics.json").unlink()
    assert main(["evaluate", "--output", str(tmp_path / "out")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["rows"] == 31 and evaluated["rows_scored"] == 30
    assert evaluated["accuracy"] == summary["metrics"]["accuracy"]
    assert (tmp_path / "out" / "_metrics.json").exists()


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    code = main(["classify", "--config", str(REPO / "configs/classify-local-eval.yaml"),
                 "--set", f"backend.model={tmp_path / 'no-model'}"])
    assert code == 2
    assert f"backend.model: no model folder at {tmp_path / 'no-model'}" in capsys.readouterr().err


def test_finetune_refuses_a_base_it_cannot_train_before_any_worker(ray_cluster, tmp_path, capsys):
    """A base given as a GGUF file's folder, or one transformers has no classifier for, ends
    `clsjob finetune` with exit 2 naming base_model, from the driver (no worker traceback)."""
    write_shards(tmp_path / "train", [{"text": sample_texts(8), "label": ["a", "b"] * 4}])
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    args = ["finetune", "--config", str(REPO / "configs/finetune-qlora.yaml"),
            "--set", f"train.path={tmp_path / 'train'}", "--set", "eval=null",
            "--set", f"output.path={tmp_path / 'out'}", "--set", "output.storage_path=null",
            "--set", "training.use_gpu=false", "--set", "training.workers=1",
            "--set", "training.cpus_per_worker=1", "--set", "cluster.autoscaling=false"]
    for base, named in (("gguf", "clsjob import-model"), ("vit", "(vit) has no sequence-classification")):
        assert main(args + ["--set", f"base_model={tmp_path / base}"]) == 2
        err = capsys.readouterr().err
        assert f"base_model: {tmp_path / base}" in err and named in err, err
    assert not (tmp_path / "out").exists()


def test_local_finetune_beside_another_ray_logs_no_traceback(ray_cluster, tmp_path):
    """`clsjob finetune` starts a local Ray of its own while this session's Ray runs on the
    same machine: Ray Train's placement-group cleaner must query its own cluster, not die on
    "Found multiple active Ray instances" with a traceback in the user's log."""
    from tiny_models import build_base

    base = build_base(tmp_path / "base", "qwen2")
    write_shards(tmp_path / "train", [{"text": sample_texts(32), "label": ["a", "b"] * 16}])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "clsjob.cli", "finetune", "--config", str(REPO / "configs/finetune-lora.yaml"),
         "--set", f"base_model={base}", "--set", f"train.path={tmp_path / 'train'}", "--set", "eval=null",
         "--set", f"output.path={tmp_path / 'out'}", "--set", "output.storage_path=null",
         "--set", "training.use_gpu=false", "--set", "training.workers=1", "--set", "training.epochs=1",
         "--set", "training.cpus_per_worker=1", "--set", "cluster.autoscaling=false"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert json.loads(proc.stdout)["train_rows"] == 32
    assert "Traceback" not in log and "multiple active Ray instances" not in log, log[-3000:]
