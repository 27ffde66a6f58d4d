"""The trainable classifier: a base model with a fresh classification head, wrapped in LoRA
(the head trained in full and saved with the adapter) or left whole for full fine-tuning."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
from safetensors import safe_open
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer,
                          BitsAndBytesConfig)

from clsjob import model_cache
from clsjob.config import FinetuneConfig, TrainingConfig
from clsjob.labels import LabelSet
from clsjob.task import SINGLE_LABEL, Task

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
                         task: Task = SINGLE_LABEL, **load_kwargs):
    """The base with a new head of len(labels) outputs and the label mapping in its config,
    of the task's problem_type (a multi-label head: one sigmoid and binary cross-entropy per
    label; a single-label head keeps the cross-entropy transformers picks from the labels)."""
    if task.problem_type:
        load_kwargs["problem_type"] = task.problem_type
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model, id2label=labels.id2label(),  # num_labels follows from id2label
        label2id=labels.label2id(), dtype=dtype, use_safetensors=True, **load_kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


@dataclass(frozen=True)
class ModelParts:
    """Where LoRA goes and what is trained in full, read off the model itself, so that every
    architecture's head is found whatever it is called (`classifier`, `score`,
    `pre_classifier` + `classifier`, RoBERTa's `classifier.dense`/`out_proj`, …)."""
    lora_targets: tuple[str, ...]  # the pretrained body's linear layers
    fresh: tuple[str, ...]         # the head, and any layer the checkpoint lacks

    def target_pattern(self) -> str:
        # peft full-matches a string against each module name: exactly these layers.
        return "|".join(re.escape(name) for name in self.lora_targets)


def checkpoint_keys(base_model: str) -> set[str]:
    """Tensor names in the base's safetensors files, from their headers only."""
    folder = Path(base_model)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    keys: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys.update(f.keys())
    return keys


def split_model(base_model: str, labels: LabelSet) -> ModelParts:
    """The classifier built on the meta device (no weights read) and compared with the
    checkpoint: every child outside the pretrained body (`base_model_prefix`) is head, and a
    linear layer of the body whose weight the checkpoint lacks (a pooler saved without, say)
    is new too. Both must be trained in full and never quantised: a fresh layer created as a
    4-bit layer is never quantised and fails its first forward."""
    config = AutoConfig.from_pretrained(base_model, id2label=labels.id2label(),
                                        label2id=labels.label2id())
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    body = model.base_model_prefix
    if not isinstance(getattr(model, body, None), torch.nn.Module):
        raise ValueError(f"base_model {base_model}: {type(model).__name__} has no body "
                         f"'{body}' to fine-tune under a classification head")
    keys = checkpoint_keys(base_model)

    def in_checkpoint(name: str) -> bool:
        # Checkpoints of the bare body (BertModel, a CausalLM's `model`) name tensors with or
        # without the body's prefix.
        return f"{name}.weight" in keys or f"{name.removeprefix(body + '.')}.weight" in keys

    head = [name for name, child in model.named_children()
            if name != body and any(True for _ in child.parameters())]
    linear = [name for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name.startswith(body + ".")]
    new = [name for name in linear if not in_checkpoint(name)]
    if new:
        log.warning("finetune: %s has no weights for %s; they start random and train in full",
                    base_model, ", ".join(new))
    return ModelParts(lora_targets=tuple(n for n in linear if n not in new),
                      fresh=tuple(head + new))


def check_base_model(cfg: FinetuneConfig) -> FinetuneConfig:
    """What the base model cannot do, found on the driver from its config.json alone, before
    any worker starts: a missing folder or one with no classifier class ends the command
    naming `base_model`; a setting that changes only speed or memory is turned off with one
    warning (gradient checkpointing: MPNet's classifier has none). Returns the config the
    workers train with."""
    from clsjob.backends import ModelError

    config, _ = model_cache.model_config(cfg.base_model, cfg.storage, key="base_model")
    if not config.get("model_type"):
        raise ModelError(f"base_model: {cfg.base_model} has no config.json with a model_type; "
                         f"a GGUF file becomes a model folder with `clsjob import-model`")
    try:
        with torch.device("meta"):  # the classes only: no weights are read or allocated
            model = AutoModelForSequenceClassification.from_config(
                AutoConfig.for_model(**config))
    except (ValueError, KeyError) as exc:
        raise ModelError(f"base_model: {cfg.base_model} ({config['model_type']}) has no "
                         f"sequence-classification class in transformers: {exc}") from None
    if cfg.training.gradient_checkpointing and not model.supports_gradient_checkpointing:
        log.warning("finetune: %s does not support gradient checkpointing; training without it "
                    "(training.gradient_checkpointing: false: more memory, same result)",
                    type(model).__name__)
        return cfg.model_copy(update={"training": cfg.training.model_copy(
            update={"gradient_checkpointing": False})})
    return cfg


def quantization_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401  (its CPU and CUDA builds both train NF4 + LoRA)
    except Exception:
        return False
    return True


def nf4_config(device: str, keep_whole: tuple[str, ...]) -> BitsAndBytesConfig:
    # bf16 compute where the GPU has it; fp32 on CPU and older GPUs, where bf16 matmuls are
    # emulated (slow) or missing.
    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
                              # Exact names: transformers' own guess (the last parameter's
                              # module) misses a head whose last parameter is a bias.
                              # Anchored: the module and its children, nothing else.
                              llm_int8_skip_modules=[f"^{re.escape(n)}(\\..+)?$" for n in keep_whole])


def keep_training_kernels(model) -> None:
    """Pin every 4-bit layer to bitsandbytes' training path.

    On a CPU with AVX-512 BF16, bitsandbytes 0.50 repacks a 4-bit weight, in place and for
    good, the first time its layer runs in eval mode without gradients (the evaluation pass
    after an epoch) into the layout of an inference-only kernel. Every training step after
    that runs through that kernel, which adds the bias in place on a tensor autograd must
    keep ("a view of a leaf Variable that requires grad is being used in an in-place
    operation"). CPUs without AVX-512 BF16, and GPUs, never repack; training never wants to."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def build_trainable(base_model: str, labels: LabelSet, training: TrainingConfig, tokenizer,
                    device: str = "cpu", task: Task = SINGLE_LABEL):
    if training.method == "full":
        return load_base_classifier(base_model, labels, tokenizer, task=task)
    quantize = training.quantization == "nf4"
    if quantize and not quantization_available():
        log.warning("finetune: bitsandbytes cannot run here; training plain LoRA instead of QLoRA")
        quantize = False
    parts = split_model(base_model, labels)
    if quantize:
        # The whole 4-bit model on this worker's own device: device_map="auto" would shard it
        # over the GPUs, and DDP needs one full replica per worker.
        model = load_base_classifier(base_model, labels, tokenizer, task=task,
                                     quantization_config=nf4_config(device, parts.fresh),
                                     device_map={"": device})
        keep_training_kernels(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = load_base_classifier(base_model, labels, tokenizer, task=task)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=training.lora_r, lora_alpha=training.lora_alpha,
        lora_dropout=training.lora_dropout, bias="none",
        # LoRA on the body's linear layers; the fresh layers train in full and are saved
        # with the adapter.
        target_modules=parts.target_pattern(), modules_to_save=list(parts.fresh))
    return get_peft_model(model, lora)
