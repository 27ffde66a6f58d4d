"""Run one computation under a forced CPU code path, in a process of its own, and print its
numbers as JSON. Machines of this kind differ in CPU (AVX2 only; AVX-512 without BF16;
AVX-512 with BF16/VNNI/AMX), and torch, oneDNN, MKL, vLLM and bitsandbytes each pick kernels
by instruction set when they load: a path can only be forced before that, hence the process.

    python tests/cpu_paths.py ISA TASK MODEL_FOLDER
    ISA:  native | avx512 (AVX-512 without BF16/AMX) | avx2
    TASK: hf-probs | qlora-grads | vllm-pool-probs

A path can be forced down, never up: on an AVX2 machine `avx512` runs AVX2 code.
"""
from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

TEXTS = ["the film was a delight from start to finish", "card", "x",
         "my card payment was declined at the shop and the parcel never arrived " * 3]
# What each library reads, when it loads, to cap its instruction set.
ENV = {
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def machine_has_avx512() -> bool:
    """From /proc/cpuinfo, before torch loads: ATen takes ATEN_CPU_CAPABILITY at its word, and
    `avx512` on a CPU without AVX-512 dies of SIGILL (an AMD EPYC with AVX2 only)."""
    return "avx512f" in Path("/proc/cpuinfo").read_text().split()


def force(isa: str) -> None:
    if isa == "avx512" and not machine_has_avx512():
        isa = "avx2"  # forced down, never up: this machine's own top path
    os.environ.update(ENV.get(isa, {}))
    import torch

    if isa == "native":
        return
    # vLLM chooses its compiled library (_C, _C_AVX512, _C_AVX2) and kernels from torch's
    # CPU capability table, and bitsandbytes asks its own library for AVX-512 BF16: both are
    # masked before either loads.
    caps = dict(torch.cpu.get_capabilities())
    masked = ("avx512", "amx") if isa == "avx2" else ("avx512_bf16", "amx")
    caps.update({k: False for k in caps if k.startswith(masked)})
    torch.cpu.get_capabilities = lambda: types.MappingProxyType(caps)
    import bitsandbytes.functional
    import bitsandbytes.nn.modules

    bitsandbytes.functional.has_avx512bf16 = bitsandbytes.nn.modules.has_avx512bf16 = lambda: False


def hf_probs(model: str) -> dict:
    from clsjob.backends.hf import load_classifier, predict_probs
    from clsjob.config import HFBackendConfig

    net, tok = load_classifier(HFBackendConfig(model=model), "cpu")
    return {"probs": predict_probs(net, tok, TEXTS, 64, 2, "cpu").tolist()}


def qlora_grads(model: str) -> dict:
    """One QLoRA step, an evaluation pass, the same step again: the loss and the LoRA
    gradients, both times (the evaluation pass is where bitsandbytes may switch kernels)."""
    import torch

    from clsjob.config import TrainingConfig
    from clsjob.finetune.model import build_trainable, load_tokenizer
    from clsjob.labels import LabelSet

    torch.manual_seed(0)
    tok = load_tokenizer(model)
    net = build_trainable(model, LabelSet(("a", "b", "c")), TrainingConfig(lora_dropout=0.0), tok)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    gold = torch.tensor([0, 1, 2, 0])
    steps = []
    for _ in range(2):
        net.train()
        loss = net(**batch, labels=gold).loss
        loss.backward()
        grads = {n: p.grad.norm().item() for n, p in net.named_parameters() if p.grad is not None}
        net.zero_grad()
        steps.append({"loss": loss.item(), "grads": grads})
        net.eval()
        with torch.no_grad():
            net(**batch)
    quant_states = [m.weight.quant_state for m in net.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    return {"steps": steps, "layers_4bit": len(quant_states),
            "repacked": sum(bool(getattr(q, "packing_format_for_cpu", False)) for q in quant_states)}


def vllm_pool_probs(model: str) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this (masked) process
    from clsjob.backends.vllm_engine import engine_args, start_engine
    from clsjob.config import VLLMPoolBackendConfig
    from vllm.inputs import TokensPrompt

    llm = start_engine(engine_args(VLLMPoolBackendConfig(model=model, max_length=64), False, "pooling"))
    ids = llm.get_tokenizer()(TEXTS)["input_ids"]
    out = llm.classify([TokensPrompt(prompt_token_ids=i) for i in ids], use_tqdm=False)
    return {"probs": [o.outputs.probs for o in out], "libraries": vllm_libraries()}


def vllm_libraries() -> list[str]:
    """vLLM's compiled kernel libraries this process mapped (_C, _C_AVX512 or _C_AVX2)."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sorted({Path(line.split()[-1]).name.split(".")[0] for line in maps
                   if "/vllm/_C" in line})


TASKS = {"hf-probs": hf_probs, "qlora-grads": qlora_grads, "vllm-pool-probs": vllm_pool_probs}

if __name__ == "__main__":
    isa, task, folder = sys.argv[1:4]
    force(isa)
    result = TASKS[task](folder)
    import torch

    result["aten_capability"] = torch.backends.cpu.get_cpu_capability()
    print("RESULT " + json.dumps(result))
