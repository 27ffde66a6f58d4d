"""Fine-tune a tiny Qwen2 with LoRA through Ray Train, merge it, and serve it with `hf`."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from peft import PeftModel

from clsjob.backends.hf import load_classifier, predict_probs
from clsjob.config import (ClassifyConfig, FinetuneConfig, HFBackendConfig, MergeConfig,
                           VLLMPoolBackendConfig, validate)
from clsjob.finetune.merge import merge
from clsjob.finetune.model import load_base_classifier, load_tokenizer
from clsjob.finetune.train import SUMMARY, run_finetune
from clsjob.labels import LabelSet
from clsjob.run.pipeline import run_classify
from helpers import check_output_contract, sample_texts, write_shards
from tiny_models import build_qwen2_classifier
from tracking_files import tensorboard_events, wandb_offline_run

# A task the tiny model can learn in a few steps: the label is the first word.
WORDS = {"card": "billing", "parcel": "delivery", "account": "access"}


def task_rows(n: int, seed: int) -> dict:
    texts = sample_texts(n, seed=seed)
    first = list(WORDS)
    texts = [f"{first[i % 3]} {t}" for i, t in enumerate(texts)]
    return {"text": texts + [None], "label": [WORDS[t.split()[0]] for t in texts] + ["billing"]}


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    base = build_qwen2_classifier(root / "base", ["unused"], causal_lm=True)
    write_shards(root / "train", [task_rows(96, 0), task_rows(96, 1)])
    write_shards(root / "eval", [task_rows(48, 2)])
    cfg = validate({
        "base_model": str(base),
        "train": {"path": str(root / "train"), "label_column": "label"},
        "eval": {"path": str(root / "eval"), "label_column": "label"},
        "training": {"epochs": 3, "learning_rate": 3e-3, "batch_size": 16, "max_length": 48,
                     "lora_r": 8, "lora_alpha": 16,
                     # abstain.score: distance's index: 20 training rows a label.
                     "distance_index_rows": 60, "distance_k": 5,
                     # Every tracker, into files: the MLflow file store and W&B offline.
                     "report_to": ["mlflow", "tensorboard", "wandb"],
                     "tracking": {"experiment": "tiny-qwen", "wandb_mode": "offline"}},
        "output": {"path": str(root / "adapter")},
    }, model=FinetuneConfig)
    summary = run_finetune(cfg)
    return root, base, summary


def test_finetune_writes_adapter_head_and_summary(trained):
    root, base, summary = trained
    adapter = root / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert json.loads((adapter / SUMMARY).read_text())["labels"] == sorted(WORDS.values())
    assert summary["train_rows"] == 192 and summary["eval_rows"] == 48  # null-text rows skipped
    assert len(summary["epochs"]) == 3  # evaluated every epoch
    # It learned the task (chance is 1/3).
    assert summary["final_eval"]["eval_accuracy"] >= 0.9
    assert summary["train_tokens_per_s"] > 0
    # A temperature fitted on the 48 eval rows: accuracy as before, NLL no worse (T = 1 is
    # among the temperatures searched), recorded with the numbers a user judges it by.
    cal = summary["calibration"]
    assert cal["rows"] == 48 and cal["accuracy"] == pytest.approx(summary["final_eval"]["eval_accuracy"])
    assert 0.05 <= cal["temperature"] <= 100 and cal["temperature"] != 1.0
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9
    # Every eval row right (the task is easy): sharper is always better, so the fit stops at
    # the smallest temperature searched and says so.
    assert cal["at_bound"] == (cal["accuracy"] == 1.0 and cal["temperature"] == pytest.approx(0.05))
    # The abstention threshold picked on the calibrated eval confidences (2 points at most).
    assert 0 < cal["abstain"]["below"] <= 1 and cal["abstain"]["max_accuracy_loss"] == 0.02
    assert cal["abstain"]["eval_rows_under"] <= 0.02 * 48 + (48 - 48 * cal["accuracy"])


def test_merged_folder_reproduces_the_adapter_model(trained, tmp_path):
    root, base, _ = trained
    out = Path(merge(validate({"adapter": str(root / "adapter"), "output": str(tmp_path / "merged"),
                               "dtype": "float32"}, model=MergeConfig)))
    config = json.loads((out / "config.json").read_text())
    temperature = json.loads((root / "adapter" / SUMMARY).read_text())["calibration"]["temperature"]
    assert config["clsjob_temperature"] == temperature  # carried from the summary by merge
    assert config["clsjob_abstain_below"] == json.loads((root / "adapter" / SUMMARY).read_text())[
        "calibration"]["abstain"]["below"]
    assert config["architectures"] == ["Qwen2ForSequenceClassification"]
    assert config["id2label"] == {"0": "access", "1": "billing", "2": "delivery"}
    assert config["pad_token_id"] is not None and list(out.glob("*.safetensors"))

    labels = LabelSet(("access", "billing", "delivery"))
    tok = load_tokenizer(str(root / "adapter"))
    adapter_model = PeftModel.from_pretrained(
        load_base_classifier(str(base), labels, tok), root / "adapter").eval()
    merged, merged_tok = load_classifier(HFBackendConfig(model=str(out)), "cpu")
    texts = task_rows(20, 9)["text"][:20]
    with torch.inference_mode():
        enc = tok(texts, padding=True, return_tensors="pt")
        logits = adapter_model(**enc).logits
        want = torch.softmax(logits, -1).numpy()
        calibrated = torch.softmax(logits / temperature, -1).numpy()
    got = predict_probs(merged, merged_tok, texts, 512, 8, "cpu")  # no truncation, as above
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(predict_probs(merged, merged_tok, texts, 512, 8, "cpu",
                                             temperature=temperature), calibrated, atol=1e-5)
    assert (got.argmax(1) == np.array([labels.id_of(WORDS[t.split()[0]]) for t in texts])).mean() >= 0.9

    # The same folder served by vLLM's pooling runner, in a Ray worker: this test process has
    # loaded Flask (moto's server), which vLLM's CPU start-up trips over (see the Makefile).
    pytest.importorskip("vllm")
    # vLLM gives softmax(logits); the back end applies the folder's temperature to them.
    served = ray.get(serve_with_vllm_pool.remote(str(out), labels, texts))
    np.testing.assert_allclose(np.array(served), calibrated, atol=1e-4)


@ray.remote(num_cpus=1)
def serve_with_vllm_pool(model: str, labels: LabelSet, texts: list[str]) -> list:
    from clsjob.backends.vllm_pool import VLLMPoolClassifier
    from clsjob.config import InputConfig
    from clsjob.run.prepare import prepare_chunk

    pool = VLLMPoolClassifier(VLLMPoolBackendConfig(model=model), labels, "text", False)
    out = pool(prepare_chunk(pa.table({"text": texts}), "s", 0, InputConfig(path="x")))
    return out.column("probs").to_pylist()


def test_rows_far_from_the_training_rows_are_abstained_on_by_distance(trained, tmp_path):
    """The index and the distance threshold the fine-tune picked on its eval rows travel with
    the merged folder; classify scores every row in the same forward pass that labels it and
    abstains on the rows unlike any the model was trained on."""
    root, _, summary = trained
    distance = summary["distance"]
    assert distance["rows"] == 60 and distance["per_class"] == 20 and distance["k"] == 5
    assert distance["eval_rows"] == 48 and 0 < distance["above"] < 2
    # Within the 2-point budget on the eval rows (each of them right or not, it may give up
    # at most floor(0.02 x 48) = 0 right rows).
    assert distance["eval_rows_above"] <= 48 - 48 * summary["final_eval"]["eval_accuracy"]
    folder = merge(validate({"adapter": str(root / "adapter"), "output": str(tmp_path / "merged")},
                            model=MergeConfig))
    assert json.loads((Path(folder) / "config.json").read_text())["clsjob_distance"] == {
        "k": 5, "above": distance["above"], "rows": 60,
        "mahalanobis_above": distance["mahalanobis_above"]}
    index = np.load(Path(folder) / "clsjob_distance_index.npy")
    assert index.shape[0] == 60 and index.dtype == np.float16
    with np.load(Path(folder) / "clsjob_distance_gaussians.npz") as gaussians:
        assert gaussians["means"].shape == (3, index.shape[1])
        assert gaussians["precision"].shape == (index.shape[1], index.shape[1])
    assert distance["mahalanobis_above"] > 0
    assert distance["eval_rows_over_mahalanobis"] <= 48 - 48 * summary["final_eval"]["eval_accuracy"]

    in_scope = task_rows(40, 7)["text"][:40]
    far = [f"{n} {n * 7} # {n * 13} % ~ {n * 31}" for n in range(40)]
    write_shards(tmp_path / "in", [{"text": in_scope + far}])
    out = check_output_contract(run_classify(validate({
        "input": {"path": str(tmp_path / "in")},
        "backend": {"model": folder, "max_length": 48},
        "abstain": {"score": "distance", "label": "out_of_scope"},
        "output": {"path": str(tmp_path / "out"), "rows_per_part": 30}}, model=ClassifyConfig)),
        tmp_path / "out", rows=80, errored=0)
    # Exactly the rows over the folder's threshold are abstained on.
    assert [row["label"] == "out_of_scope" for row in out] == [
        row["ood_score"] > distance["above"] for row in out]
    by_text = {row["text"]: row for row in out}
    score = {name: np.array([by_text[t]["ood_score"] for t in texts])
             for name, texts in (("in", in_scope), ("far", far))}
    kept = np.mean([by_text[t]["label"] != "out_of_scope" for t in in_scope])
    # The far rows lie further out: most beyond nearly every in-scope row.
    assert np.median(score["far"]) > 2 * np.median(score["in"])
    assert np.mean(score["far"] > np.percentile(score["in"], 95)) >= 0.5
    # The threshold picked on in-scope eval rows keeps in-scope rows.
    assert kept >= 0.85

    # abstain.distance: mahalanobis, the class means the same folder carries, and its threshold.
    out = check_output_contract(run_classify(validate({
        "input": {"path": str(tmp_path / "in")},
        "backend": {"model": folder, "max_length": 48},
        "abstain": {"score": "distance", "distance": "mahalanobis", "label": "out_of_scope"},
        "output": {"path": str(tmp_path / "out-m"), "rows_per_part": 30}}, model=ClassifyConfig)),
        tmp_path / "out-m", rows=80, errored=0)
    assert [row["label"] == "out_of_scope" for row in out] == [
        row["ood_score"] > distance["mahalanobis_above"] for row in out]
    by_text = {row["text"]: row for row in out}
    score = {name: np.array([by_text[t]["ood_score"] for t in texts])
             for name, texts in (("in", in_scope), ("far", far))}
    assert np.median(score["far"]) > 2 * np.median(score["in"])
    assert np.mean(score["far"] > np.percentile(score["in"], 95)) >= 0.5
    assert np.mean([by_text[t]["label"] != "out_of_scope" for t in in_scope]) >= 0.85


def test_rerun_of_a_finished_finetune_does_nothing(trained):
    root, base, summary = trained
    adapter = root / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    cfg = validate({"base_model": str(base), "train": {"path": str(root / "train"), "label_column": "label"},
                    "output": {"path": str(root / "adapter")}}, model=FinetuneConfig)
    assert run_finetune(cfg) == json.loads((root / "adapter" / SUMMARY).read_text())
    assert adapter.stat().st_mtime_ns == before


def points(pairs) -> list[tuple[int, float]]:
    """(step, value) pairs as every tracker stores them: float32 values, compared rounded."""
    return [(int(step), round(float(value), 5)) for step, value in pairs]


def test_each_tracker_holds_the_config_every_epoch_and_the_calibration(trained, monkeypatch):
    root, _, summary = trained
    tracking = root / "adapter" / "tracking"
    epochs = points((e["step"], e["eval_accuracy"]) for e in summary["epochs"])
    temperature = summary["calibration"]["temperature"]
    assert len(epochs) == 3 and epochs[0][0] < epochs[1][0] < epochs[2][0]

    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading it, as the job wrote it
    client = mlflow.MlflowClient((tracking / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-qwen").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("finetune-")
    assert run.data.params["clsjob.training.learning_rate"] == "0.003"
    assert run.data.params["clsjob.train.path"] == str(root / "train")
    history = client.get_metric_history(run.info.run_id, "eval_accuracy")
    assert sorted(points((m.step, m.value) for m in history)) == epochs
    assert run.data.metrics["calibration/temperature"] == pytest.approx(temperature)
    assert run.data.metrics["final/eval_accuracy"] == pytest.approx(summary["final_eval"]["eval_accuracy"])

    scalars, texts = tensorboard_events(tracking / "tensorboard")
    assert points(scalars["eval/accuracy"]) == epochs  # the HF integration's name for it
    assert points(scalars["calibration/temperature"]) == points([(epochs[-1][0], temperature)])
    assert json.loads(texts["clsjob_config/text_summary"].strip("`\n"))["training"]["report_to"] == [
        "mlflow", "tensorboard", "wandb"]

    wandb_run = wandb_offline_run(tracking / "wandb")
    # The HF integration logs each epoch, and the final evaluation (a predict) once more.
    final = points([(epochs[-1][0], summary["final_eval"]["eval_accuracy"])])
    assert points((row["train/global_step"], row["eval/accuracy"]) for row in wandb_run["history"]
                  if "eval/accuracy" in row) == epochs + final
    assert wandb_run["summary"]["calibration/temperature"] == pytest.approx(temperature)
    assert wandb_run["config"]["clsjob"]["training"]["lora_r"] == 8
