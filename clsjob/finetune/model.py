"""The trainable classifier: a base model with a fresh classification head, wrapped in LoRA
(the head trained in full and saved with the adapter) or left whole for full fine-tuning."""
from __future__ import annotations

import logging

import torch
from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from clsjob.config import TrainingConfig
from clsjob.labels import LabelSet

log = logging.getLogger("clsjob")


def load_tokenizer(base_model: str):
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        # Decoder bases often have none; the classifier pools on the last non-pad token, so
        # the pad id must be set and saved with the model.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_classifier(base_model: str, labels: LabelSet, tokenizer, dtype=torch.float32,
                         **load_kwargs):
    """The base with a new head of len(labels) outputs and the label mapping in its config."""
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model, id2label=labels.id2label(),  # num_labels follows from id2label
        label2id=labels.label2id(), dtype=dtype, use_safetensors=True, **load_kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def quantization_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401  (its CPU and CUDA builds both train NF4 + LoRA)
    except Exception:
        return False
    return True


def nf4_config(device: str) -> BitsAndBytesConfig:
    # bf16 compute where the GPU has it; fp32 on CPU and older GPUs, where bf16 matmuls are
    # emulated (slow) or missing.
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)


def build_trainable(base_model: str, labels: LabelSet, training: TrainingConfig, tokenizer,
                    device: str = "cpu"):
    if training.method == "full":
        return load_base_classifier(base_model, labels, tokenizer)
    quantize = training.quantization == "nf4"
    if quantize and not quantization_available():
        log.warning("finetune: bitsandbytes cannot run here; training plain LoRA instead of QLoRA")
        quantize = False
    if quantize:
        # The whole 4-bit model on this worker's own device: device_map="auto" would shard it
        # over the GPUs, and DDP needs one full replica per worker.
        model = load_base_classifier(base_model, labels, tokenizer, quantization_config=nf4_config(device),
                                     device_map={"": device})
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = load_base_classifier(base_model, labels, tokenizer)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=training.lora_r, lora_alpha=training.lora_alpha,
        lora_dropout=training.lora_dropout, bias="none",
        # Every linear layer of the body; peft keeps the new head out of LoRA and, for
        # SEQ_CLS, trains it in full and saves it with the adapter (modules_to_save).
        target_modules="all-linear")
    return get_peft_model(model, lora)
