"""QLoRA with the shipped default training settings on every model family the project claims
(tiny_models.FAMILIES): encoders saved as the bare body (BERT like all-MiniLM, MPNet like
all-mpnet-base-v2, DistilBERT, DeBERTa-v2, ModernBERT), RoBERTa as a masked-LM checkpoint,
decoders as causal-LM checkpoints (Qwen2, Llama, Llama whose tokenizer has no pad token,
Gemma 3's text model) and a Qwen2 brought in from GGUF by `clsjob import-model`. Each is
fine-tuned through Ray Train from `configs/finetune-qlora.yaml` (only the paths and the scale
swapped), merged with `configs/merge.yaml`, and served by `hf`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from clsjob.backends.hf import load_classifier, predict_probs
from clsjob.config import FinetuneConfig, HFBackendConfig, MergeConfig, load_config
from clsjob.finetune.merge import merge
from clsjob.finetune.model import load_base_classifier
from clsjob.finetune.train import run_finetune
from clsjob.labels import LabelSet
from helpers import REPO, write_shards
from test_finetune import task_rows
from tiny_models import FAMILIES, build_base

pytestmark = pytest.mark.slow
# Only where the data is and how much of it: the training settings stay the shipped ones.
SCALE = ["training.use_gpu=false", "training.workers=1", "training.cpus_per_worker=1",
         "training.epochs=3", "training.batch_size=16", "training.max_length=32",
         "output.storage_path=null"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    # 161 rows with batches of 16: the last batch of every epoch holds one row; one-word rows
    # ("card", "parcel", "account") are one-token texts.
    train = task_rows(149, 0)
    train["text"] = train["text"][:-1] + ["card", "parcel", "account"] * 4
    train["label"] = train["label"][:-1] + ["billing", "delivery", "access"] * 4
    write_shards(root / "train", [train])
    write_shards(root / "eval", [task_rows(48, 2)])
    return root


def shipped_finetune(name: str, base, root, out, *extra: str) -> FinetuneConfig:
    return load_config(REPO / "configs" / name, [
        f"base_model={base}", f"train.path={root / 'train'}", f"eval.path={root / 'eval'}",
        f"output.path={out}", *SCALE, *extra], model=FinetuneConfig)


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_defaults_train_merge_and_serve(family, data, ray_cluster, tmp_path):
    base = build_base(tmp_path / "base", family)
    cfg = shipped_finetune("finetune-qlora.yaml", base, data, tmp_path / "adapter")
    assert (cfg.training.method, cfg.training.quantization, cfg.training.gradient_checkpointing) \
        == ("lora", "nf4", True)
    summary = run_finetune(cfg)

    assert summary["quantization"] == "nf4" and summary["train_rows"] == 161
    # MPNet's classifier has no gradient checkpointing: the driver turns it off before any
    # worker starts, instead of every worker dying on it.
    assert summary["config"]["training"]["gradient_checkpointing"] == (family != "mpnet")
    losses = [e["eval_loss"] for e in summary["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0], losses

    merged = Path(merge(load_config(REPO / "configs" / "merge.yaml", [
        f"adapter={tmp_path / 'adapter'}", f"output={tmp_path / 'merged'}"], model=MergeConfig)))
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert config["id2label"] == {"0": "access", "1": "billing", "2": "delivery"}

    model, tokenizer = load_classifier(HFBackendConfig(model=str(merged)), "cpu")
    texts = task_rows(30, 9)["text"][:30] + ["card", "parcel", "account", "x"]
    batched = predict_probs(model, tokenizer, texts, 512, 8, "cpu")
    one_by_one = np.concatenate([predict_probs(model, tokenizer, [t], 512, 1, "cpu") for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert np.allclose(batched.sum(axis=1), 1.0, atol=1e-5)

    # The served model is the trained one: the adapter on its full-precision base gives the
    # same probabilities as the folder merged in fp32 (bf16 above rounds the weights). Not
    # accuracy: a few steps at the shipped rate leave a tiny model near ties.
    exact = Path(merge(load_config(REPO / "configs" / "merge.yaml", [
        f"adapter={tmp_path / 'adapter'}", f"output={tmp_path / 'merged32'}", "dtype=float32"],
        model=MergeConfig)))
    labels = LabelSet(("access", "billing", "delivery"))
    adapter = PeftModel.from_pretrained(load_base_classifier(str(base), labels, tokenizer),
                                        tmp_path / "adapter").eval()
    with torch.inference_mode():
        want = np.concatenate([torch.softmax(adapter(**tokenizer([t], return_tensors="pt")).logits, -1)
                               .numpy() for t in texts])
    model, tokenizer = load_classifier(HFBackendConfig(model=str(exact)), "cpu")
    np.testing.assert_allclose(predict_probs(model, tokenizer, texts, 512, 8, "cpu"), want, atol=1e-5)


def test_shipped_lora_config_trains(data, ray_cluster, tmp_path):
    base = build_base(tmp_path / "base", "qwen2")
    cfg = shipped_finetune("finetune-lora.yaml", base, data, tmp_path / "adapter")
    summary = run_finetune(cfg)
    losses = [e["eval_loss"] for e in summary["epochs"]]
    assert summary["method"] == "lora" and losses[-1] < losses[0], losses
