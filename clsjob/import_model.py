"""`clsjob import-model`: a GGUF file (llama.cpp, Ollama) -> an ordinary transformers model
folder (safetensors, tokenizer, chat template) that `finetune` can start from and every back
end can serve. vLLM's CPU build does not read GGUF, and peft cannot train a GGUF-loaded model.

transformers' GGUF loader dequantises the file on load; the model it returns carries the
GGUF quantization config and refuses `save_pretrained`, so the weights are moved into a model
built afresh from the same config (with no quantization config) and saved from there. What
transformers cannot read — an architecture its GGUF loader does not map, a tensor type the
`gguf` package cannot dequantise — is refused before any weight is read, naming it."""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger("clsjob")
DTYPES = ("float32", "bfloat16", "float16")
# Stored as floats already: read as they are, no dequantisation.
PLAIN_TYPES = {"F32", "F16", "BF16", "F64"}


class GGUFError(ValueError):
    """A GGUF file that cannot be imported; the message names the file and what is missing."""


def read_flag(reader, key: str) -> bool | None:
    field = reader.fields.get(key)
    return None if field is None else bool(field.parts[field.data[0]][0])


def inspect_gguf(path: Path) -> dict:
    """The file's architecture, its tensors' types and whether its tokenizer adds BOS / EOS
    tokens, from the header only; refuses what transformers' GGUF loader cannot turn into a
    model."""
    from gguf import GGUFReader
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFError(f"{path}: no general.architecture in the GGUF metadata")
    architecture = bytes(field.parts[field.data[0]]).decode()
    # transformers reads llama.cpp's "qwen2moe" as qwen2_moe and the like.
    normalised = architecture.replace("moe", "_moe").replace("-", "_")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES and normalised not in GGUF_SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {architecture!r} is not one transformers' GGUF "
                           f"loader supports ({', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    readable = PLAIN_TYPES | {t.name for t in _type_traits}
    unreadable = sorted(set(types) - readable)
    if unreadable:
        raise GGUFError(f"{path}: tensor type(s) {unreadable} cannot be dequantised by the gguf "
                           f"package (it reads {', '.join(sorted(readable))})")
    return {"architecture": architecture, "tensor_types": dict(types), "tensors": len(reader.tensors),
            "add_bos_token": read_flag(reader, "tokenizer.ggml.add_bos_token"),
            "add_eos_token": read_flag(reader, "tokenizer.ggml.add_eos_token")}


def import_gguf(gguf_file: str | Path, output: str | Path, dtype: str = "float32") -> dict:
    """Write the transformers folder of `gguf_file` to `output` and return what was imported.

    float32 keeps the dequantised weights exactly (the folder gives the GGUF model's logits);
    bfloat16 halves the folder at a rounding of each weight. The folder appears complete or
    not at all: it is written beside `output` and renamed into place."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, target = Path(gguf_file), Path(output)
    if not source.is_file():
        raise FileNotFoundError(f"import-model: no GGUF file at {source}")
    if dtype not in DTYPES:
        raise GGUFError(f"import-model: --dtype {dtype!r} is not one of {DTYPES}")
    if target.exists():
        raise FileExistsError(f"import-model: {target} already exists; choose a new --output")
    started = time.monotonic()
    found = inspect_gguf(source)
    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers' GGUF tokenizer drops these flags: Gemma's file asks for <bos> before every
    # text, and Gemma without it continues "Paris is the capital of" with "the capital of".
    for flag in ("add_bos_token", "add_eos_token"):
        if found[flag] is not None:
            setattr(tokenizer, flag, found[flag])
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # The GGUF quantization config is what makes save_pretrained refuse, and nothing in the
    # saved folder is quantised.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    untied = [k for k in missing if not model.config.tie_word_embeddings or "lm_head" not in k]
    if untied or unexpected:
        raise GGUFError(f"{source}: the rebuilt {type(model).__name__} does not match the "
                           f"loaded weights (missing {untied[:5]}, unexpected {unexpected[:5]})")
    del loaded
    if tokenizer.pad_token is None:
        log.info("import-model: the tokenizer has no pad token (finetune and the back ends "
                 "pad with its end-of-text token)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        model.to(getattr(torch, dtype)).save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    result = {"model": str(target), "architecture": found["architecture"],
              "model_class": type(model).__name__, "tensor_types": found["tensor_types"],
              "parameters": sum(p.numel() for p in model.parameters()), "dtype": dtype,
              "chat_template": bool(getattr(tokenizer, "chat_template", None)),
              "seconds": round(time.monotonic() - started, 1)}
    log.info("import-model: %s -> %s (%s, %d parameters, %.0f s)", source, target,
             result["model_class"], result["parameters"], result["seconds"])
    return result
