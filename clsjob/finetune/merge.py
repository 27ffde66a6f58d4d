"""merge(cfg): fold a trained LoRA adapter into its base and write the model folder every back
end loads (safetensors shards, tokenizer, id2label/label2id, pad_token_id)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from clsjob import model_cache, model_folder, store
from clsjob.config import MergeConfig
from clsjob.finetune.model import load_base_classifier, load_tokenizer
from clsjob.finetune.summary import SUMMARY
from clsjob.labels import LabelSet
from clsjob.task import Task

log = logging.getLogger("clsjob")


def merge(cfg: MergeConfig) -> str:
    """Merge and write the model folder to `cfg.output` (local or s3://); returns its path.
    An s3:// adapter or base model is fetched into this node's model cache first."""
    summary_url = store.join(cfg.adapter, SUMMARY)
    if not store.exists(summary_url, cfg.storage):
        raise FileNotFoundError(f"adapter: {cfg.adapter} has no {SUMMARY}; is it a `clsjob finetune` output?")
    adapter = Path(model_cache.local_model(cfg.adapter, cfg.storage, key="adapter"))
    info = json.loads((adapter / SUMMARY).read_text())
    labels = LabelSet(tuple(info["labels"]))
    task = Task.of(info.get("task", "single_label"))
    # The base loads in full precision of `dtype`, never 4-bit: merging into quantised
    # weights would round the LoRA update away.
    dtype = getattr(torch, cfg.dtype)
    tokenizer = load_tokenizer(str(adapter))
    if info["method"] == "lora":
        base_folder = model_cache.local_model(info["base_model"], cfg.storage,
                                              key=f"base_model (in {summary_url})")
        base = load_base_classifier(base_folder, labels, tokenizer, dtype=dtype, task=task)
        model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(adapter, dtype=dtype,
                                                                   use_safetensors=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.id2label, model.config.label2id = labels.id2label(), labels.label2id()
    # The task's head, and what the fine-tune fitted on its eval rows (model_folder.py).
    for key, value in model_folder.written_keys(task, info).items():
        setattr(model.config, key, value)

    def write(out: Path) -> None:
        model.save_pretrained(out, max_shard_size=cfg.max_shard_size)
        tokenizer.save_pretrained(out)
        for name in (model_folder.DISTANCE_INDEX, model_folder.DISTANCE_GAUSSIANS):
            if (adapter / name).exists():  # abstain.score: distance's
                shutil.copyfile(adapter / name, out / name)

    model_cache.publish_folder(write, cfg.output, cfg.storage)
    log.info("merge: %s (+ %s) -> %s", info["base_model"], cfg.adapter, cfg.output)
    return cfg.output
