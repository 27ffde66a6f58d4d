"""The GPU tier (`make test-gpu`): the code paths only a CUDA device takes, on tiny models.
Skipped without CUDA; nothing here imports Ray, so it runs on a bare GPU machine too.

- the hf back end in bf16 on CUDA against fp32 on the CPU;
- QLoRA on CUDA (NF4 layers, bf16 compute): one optimizer step moves the adapter;
- that adapter merged by `clsjob merge` and served by the hf back end on CUDA.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from clsjob.backends.hf import HFClassifier
from clsjob.config import HFBackendConfig, InputConfig, MergeConfig, TrainingConfig, validate
from clsjob.finetune.merge import merge
from clsjob.finetune.model import build_trainable, load_tokenizer
from clsjob.finetune.summary import SUMMARY
from clsjob.labels import LabelSet
from clsjob.run.prepare import prepare_chunk
from helpers import LABELS, sample_texts
from tiny_models import build_bert_classifier, build_qwen2_classifier

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
# bf16 keeps 8 bits of mantissa: a probability near 0.5 moves by up to ~2^-8 per rounding,
# and a few layers compound it. These tests passed on an H200 (torch 2.11, CUDA 13) within it.
BF16_PROB_TOLERANCE = 0.03


def chunk(n: int = 48) -> pa.Table:
    return prepare_chunk(pa.table({"text": sample_texts(n, seed=3)}), "gpu.parquet", 0,
                         InputConfig(path="gpu"))


@pytest.mark.parametrize("build", [build_qwen2_classifier, build_bert_classifier],
                         ids=["qwen2", "bert"])
def test_hf_in_bf16_on_cuda_matches_fp32_on_cpu(build, tmp_path):
    folder = build(tmp_path / "model", LABELS)
    backend = HFBackendConfig(model=str(folder), max_length=64, micro_batch_size=8)
    rows = chunk()
    gpu = HFClassifier(backend, None, "text", use_gpu=True)
    assert gpu.device == "cuda" and next(gpu.model.parameters()).dtype == torch.bfloat16
    on_gpu = np.array(gpu(rows).column("probs").to_pylist())
    on_cpu = np.array(HFClassifier(backend, None, "text", use_gpu=False)(rows).column("probs").to_pylist())
    assert np.abs(on_gpu - on_cpu).max() <= BF16_PROB_TOLERANCE
    # Labels agree wherever fp32's own margin between its top two exceeds what bf16 can move.
    top2 = np.sort(on_cpu, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * BF16_PROB_TOLERANCE
    assert (on_gpu.argmax(1) == on_cpu.argmax(1))[clear].all()


def test_qlora_step_on_cuda_then_merged_and_served(tmp_path):
    labels = LabelSet(tuple(LABELS))
    base = build_qwen2_classifier(tmp_path / "base", LABELS)
    tokenizer = load_tokenizer(str(base))
    training = TrainingConfig(quantization="nf4", lora_r=8, lora_alpha=16, learning_rate=1e-2,
                              use_gpu=True)
    model = build_trainable(str(base), labels, training, tokenizer, device="cuda")
    from bitsandbytes.nn import Linear4bit  # peft's wrapper has the same class name

    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert quantized and all(m.weight.quant_type == "nf4" for m in quantized)
    assert quantized[0].compute_dtype == torch.bfloat16  # bf16 compute on a GPU that has it
    assert quantized[0].weight.device.type == "cuda"

    batch = tokenizer(sample_texts(16, seed=4), padding=True, truncation=True, max_length=32,
                      return_tensors="pt").to("cuda")
    batch["labels"] = torch.arange(16, device="cuda") % len(LABELS)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    moved = [n for n, p in model.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    assert moved, "the optimizer step left every LoRA weight where it was"

    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    (adapter / SUMMARY).write_text(json.dumps({"base_model": str(base), "method": "lora",
                                               "quantization": "nf4", "labels": list(LABELS)}))
    merged = Path(merge(validate({"adapter": str(adapter), "output": str(tmp_path / "merged")},
                                 model=MergeConfig)))
    served = HFClassifier(HFBackendConfig(model=str(merged), max_length=32), None, "text", use_gpu=True)
    rows = chunk(16)
    out = served(rows)
    assert out.column("error").null_count == 16 and set(out.column("label").to_pylist()) <= set(LABELS)
    # The served folder is the trained model: its probabilities are the adapter's, in eval mode.
    model.eval()
    with torch.no_grad():
        ids = tokenizer(rows.column("text").to_pylist(), padding=True, truncation=True,
                        max_length=32, return_tensors="pt").to("cuda")
        expected = torch.softmax(model(**ids).logits.float(), -1).cpu().numpy()
    got = np.array(out.column("probs").to_pylist())
    assert np.abs(got - expected).max() <= BF16_PROB_TOLERANCE
