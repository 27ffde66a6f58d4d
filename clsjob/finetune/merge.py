"""merge(cfg): fold a trained LoRA adapter into its base and write the model folder every back
end loads (safetensors shards, tokenizer, id2label/label2id, pad_token_id)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from clsjob.config import MergeConfig
from clsjob.finetune.model import load_base_classifier, load_tokenizer
from clsjob.finetune.summary import SUMMARY
from clsjob.labels import LabelSet

log = logging.getLogger("clsjob")


def merge(cfg: MergeConfig) -> Path:
    adapter = Path(cfg.adapter)
    if not (adapter / SUMMARY).exists():
        raise FileNotFoundError(f"adapter: {adapter} has no {SUMMARY}; is it a `clsjob finetune` output?")
    info = json.loads((adapter / SUMMARY).read_text())
    labels = LabelSet(tuple(info["labels"]))
    # The base loads in full precision of `dtype`, never 4-bit: merging into quantised
    # weights would round the LoRA update away.
    dtype = getattr(torch, cfg.dtype)
    tokenizer = load_tokenizer(str(adapter))
    if info["method"] == "lora":
        base = load_base_classifier(info["base_model"], labels, tokenizer, dtype=dtype)
        model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(adapter, dtype=dtype,
                                                                   use_safetensors=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.id2label, model.config.label2id = labels.id2label(), labels.label2id()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=cfg.max_shard_size)
    tokenizer.save_pretrained(out)
    log.info("merge: %s (+ %s) -> %s", info["base_model"], adapter, out)
    return out
