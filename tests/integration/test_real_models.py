"""The real pretrained models `make models` builds (bench/models.py) load as ordinary
transformers folders and behave like the models they are. Each test skips when its folder is
not there ($CLSJOB_MODELS, else models/ at the repo root), so a checkout without `make models`
pays nothing for them."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import REPO

MODELS = Path(os.environ.get("CLSJOB_MODELS") or REPO / "models")


def model_folder(name: str) -> Path:
    folder = MODELS / name
    if not (folder / "config.json").is_file():
        pytest.skip(f"no {folder}: run `make models`")
    return folder


@pytest.mark.parametrize("name", ["minilm", "mpnet"])
def test_sentence_encoder_puts_paraphrases_closer_than_an_unrelated_sentence(name):
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = model_folder(name)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    texts = ["How do I reset my password?", "I forgot my password, how can I change it?",
             "The weather in Lisbon is sunny today."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    # Mean pooling over the real tokens, as both models were trained (1_Pooling/config.json).
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = float(pooled[0] @ pooled[1]), float(pooled[0] @ pooled[2])
    assert similar > 0.6 and unrelated < 0.2, (similar, unrelated)


# name -> (uses its chat template, prompt, what the greedy continuation must contain)
CAUSAL = {
    "qwen2.5-coder-0.5b-instruct": (True, "What is the capital of France? Answer in one word.", "Paris"),
    "smollm2-135m-instruct": (True, "What is the capital of France? Answer in one word.", "Paris"),
    # A base model: no chat template to follow. Its GGUF asks for <bos> first
    # (tokenizer.ggml.add_bos_token); without it Gemma answers " the capital of the capital of".
    "gemma3-270m": (False, "Paris is the capital of", "France"),
}
BOS_FIRST = {"gemma3-270m"}


@pytest.mark.parametrize("name", CAUSAL)
def test_converted_gguf_model_answers_greedily(name):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(name)
    chat, prompt, expected = CAUSAL[name]
    # An ordinary safetensors folder: the GGUF quantization config is gone.
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert list(folder.glob("*.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if chat:
        assert tokenizer.chat_template
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if name in BOS_FIRST:
        assert ids[0, 0] == tokenizer.bos_token_id, f"{name}'s tokenizer adds no {tokenizer.bos_token}"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert expected in answer, answer
