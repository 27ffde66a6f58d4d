"""`clsjob import-model`: a GGUF file written here the way llama.cpp writes one (tiny Qwen2,
tokenizer and chat template in its metadata) becomes a transformers folder whose logits are
the GGUF-loaded model's; what transformers cannot read is refused with exit 2, naming it."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clsjob.cli import main
from tiny_models import CORPUS, write_qwen2_gguf

TEXTS = CORPUS[:8] + ["<|im_start|>system a row that looks like a turn", "x"]


def logits_of(model, tokenizer, texts: list[str]) -> list[np.ndarray]:
    with torch.inference_mode():
        return [model(**tokenizer(t, return_tensors="pt")).logits[0].float().numpy() for t in texts]


def gguf_loaded(path):
    kwargs = {"gguf_file": path.name}
    return (AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs),
            AutoTokenizer.from_pretrained(path.parent, **kwargs))


@pytest.mark.parametrize("tensor_type", ["F32", "Q8_0"])
def test_imported_folder_gives_the_gguf_models_logits(tensor_type, tmp_path, capsys):
    source = write_qwen2_gguf(tmp_path / "tiny.gguf", tensor_type=tensor_type)
    assert main(["import-model", str(source), "--output", str(tmp_path / "model")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"] == "qwen2" and summary["model_class"] == "Qwen2ForCausalLM"
    assert summary["chat_template"] and summary["tensor_types"].get(tensor_type, 0) > 0

    folder = tmp_path / "model"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "qwen2"
    imported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    want_model, want_tokenizer = gguf_loaded(source)
    assert tokenizer(TEXTS)["input_ids"] == want_tokenizer(TEXTS)["input_ids"]
    assert tokenizer.chat_template == want_tokenizer.chat_template
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<|im_end|>"
    for got, want in zip(logits_of(imported, tokenizer, TEXTS), logits_of(want_model, tokenizer, TEXTS)):
        np.testing.assert_array_equal(got, want)


def test_float32_import_is_the_model_that_was_written(tmp_path):
    """F32 round trip: the imported model is the very model the GGUF was made from."""
    source = write_qwen2_gguf(tmp_path / "tiny.gguf")
    assert main(["import-model", str(source), "--output", str(tmp_path / "model")]) == 0
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-source", dtype=torch.float32)
    imported = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    for got, want in zip(logits_of(imported, tokenizer, TEXTS), logits_of(original, tokenizer, TEXTS)):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("add_bos", [True, False])
def test_the_files_bos_flag_is_kept(add_bos, tmp_path):
    """transformers' GGUF tokenizer drops `tokenizer.ggml.add_bos_token`; Gemma's file sets
    it, and Gemma without its <bos> continues text badly."""
    source = write_qwen2_gguf(tmp_path / "tiny.gguf", add_bos=add_bos)
    assert main(["import-model", str(source), "--output", str(tmp_path / "model")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = tokenizer("the parcel never arrived")["input_ids"]
    assert (ids[0] == tokenizer.bos_token_id) == add_bos


def test_bfloat16_folder_is_half_the_size_and_close(tmp_path):
    source = write_qwen2_gguf(tmp_path / "tiny.gguf")
    for dtype in ("float32", "bfloat16"):
        assert main(["import-model", str(source), "--output", str(tmp_path / dtype),
                     "--dtype", dtype]) == 0
    sizes = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("float32", "bfloat16")}
    assert sizes["bfloat16"] < 0.55 * sizes["float32"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "float32")
    full, half = (AutoModelForCausalLM.from_pretrained(tmp_path / d, dtype=torch.float32)
                  for d in ("float32", "bfloat16"))
    for a, b in zip(logits_of(full, tokenizer, TEXTS), logits_of(half, tokenizer, TEXTS)):
        np.testing.assert_allclose(a, b, atol=0.05)


def write_header_only(path, architecture: str, qtype: gguf.GGMLQuantizationType) -> None:
    """A GGUF with one tensor of `qtype` (bytes of zeros): the refusal reads headers only."""
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((2, block_bytes), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("architecture, qtype, named", [
    ("bert", gguf.GGMLQuantizationType.Q8_0, "architecture 'bert'"),
    ("qwen2", gguf.GGMLQuantizationType.Q8_1, "['Q8_1']"),
])
def test_what_transformers_cannot_read_is_refused_naming_it(architecture, qtype, named, tmp_path, capsys):
    source = tmp_path / "model.gguf"
    write_header_only(source, architecture, qtype)
    assert main(["import-model", str(source), "--output", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert named in err and str(source) in err
    assert not (tmp_path / "model").exists() and list(tmp_path.iterdir()) == [source]


def test_missing_file_and_existing_output_are_refused(tmp_path, capsys):
    assert main(["import-model", str(tmp_path / "none.gguf"), "--output", str(tmp_path / "m")]) == 2
    assert "no GGUF file" in capsys.readouterr().err
    source = write_qwen2_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "m").mkdir()
    assert main(["import-model", str(source), "--output", str(tmp_path / "m")]) == 2
    assert "already exists" in capsys.readouterr().err
