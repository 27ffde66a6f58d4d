"""The trainable classifier: a base model with a fresh classification head, wrapped in LoRA
(the head trained in full and saved with the adapter) or left whole for full fine-tuning."""
from __future__ import annotations

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from clsjob.config import TrainingConfig
from clsjob.labels import LabelSet


def load_tokenizer(base_model: str):
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        # Decoder bases often have none; the classifier pools on the last non-pad token, so
        # the pad id must be set and saved with the model.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_classifier(base_model: str, labels: LabelSet, tokenizer, dtype=torch.float32):
    """The base with a new head of len(labels) outputs and the label mapping in its config."""
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model, id2label=labels.id2label(),  # num_labels follows from id2label
        label2id=labels.label2id(), dtype=dtype, use_safetensors=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def build_trainable(base_model: str, labels: LabelSet, training: TrainingConfig, tokenizer):
    model = load_base_classifier(base_model, labels, tokenizer)
    if training.method == "full":
        return model
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=training.lora_r, lora_alpha=training.lora_alpha,
        lora_dropout=training.lora_dropout, bias="none",
        # Every linear layer of the body; peft keeps the new head out of LoRA and, for
        # SEQ_CLS, trains it in full and saves it with the adapter (modules_to_save).
        target_modules="all-linear")
    return get_peft_model(model, lora)
