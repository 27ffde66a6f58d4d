"""The same numbers on every CPU code path a machine of this kind can take.

torch (ATen, oneDNN, MKL), bitsandbytes and vLLM pick kernels by instruction set when they
load; these machines come with AVX2 only, AVX-512 without BF16, or AVX-512 with BF16/VNNI/AMX.
Each path is forced in a process of its own (tests/cpu_paths.py) and compared with the
machine's own. A path can only be forced down: on an AVX2 machine every run is AVX2."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from clsjob.backends.hf import load_classifier, predict_probs
from clsjob.config import HFBackendConfig, TrainingConfig
from clsjob.finetune.model import build_trainable, load_tokenizer
from clsjob.labels import LabelSet
from helpers import REPO
from tiny_models import build_base

PATHS = ["native", "avx512", "avx2"]
RANK = ["DEFAULT", "AVX2", "AVX512"]  # torch's ATen capabilities, lowest first


def run_on(isa: str, task: str, model) -> dict:
    done = subprocess.run([sys.executable, str(REPO / "tests" / "cpu_paths.py"), isa, task, str(model)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    # Forced down to the path asked for, unless the machine is below it already.
    native = torch.backends.cpu.get_cpu_capability()
    asked = native if isa == "native" else isa.upper()
    assert result["aten_capability"] == min(asked, native, key=RANK.index), isa
    return result


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("cpu-paths-qwen2"), "qwen2")


@pytest.mark.parametrize("model", ["qwen_model", "bert_model"])
def test_hf_probabilities_agree_on_every_cpu_path(model, request):
    folder = request.getfixturevalue(model)
    probs = {isa: np.array(run_on(isa, "hf-probs", folder)["probs"]) for isa in PATHS}
    for isa in PATHS[1:]:
        np.testing.assert_allclose(probs[isa], probs["native"], atol=1e-5, err_msg=isa)


def test_qlora_step_is_the_same_on_every_cpu_path_and_after_an_eval_pass(qwen2_base):
    runs = {isa: run_on(isa, "qlora-grads", qwen2_base) for isa in PATHS}
    native = runs["native"]["steps"][0]
    assert native["grads"] and any(g > 0 for g in native["grads"].values())
    for isa, run in runs.items():
        assert run["layers_4bit"] == 14 and run["repacked"] == 0, isa
        for step in run["steps"]:  # before and after an evaluation pass, on every path
            assert step["loss"] == pytest.approx(native["loss"], rel=1e-5), isa
            assert step["grads"].keys() == native["grads"].keys()
            np.testing.assert_allclose([step["grads"][k] for k in native["grads"]],
                                       list(native["grads"].values()), rtol=1e-4, atol=1e-7,
                                       err_msg=isa)


def test_unpinned_4bit_layers_switch_to_an_inference_kernel_that_breaks_training(qwen2_base):
    """Why keep_training_kernels exists: on a CPU with AVX-512 BF16, bitsandbytes repacks a
    4-bit weight for an inference-only kernel during an eval pass, and the next training step
    fails. If a bitsandbytes upgrade stops doing this, this test says the pin can go."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX-512 BF16: bitsandbytes never repacks here")
    tok = load_tokenizer(str(qwen2_base))
    net = build_trainable(str(qwen2_base), LabelSet(("a", "b", "c")), TrainingConfig(), tok)
    layers = [m for m in net.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on this CPU
    batch = tok(["the film was a delight", "card"], padding=True, return_tensors="pt")
    net.eval()
    with torch.no_grad():
        net(**batch)
    assert all(layer.weight.quant_state.packing_format_for_cpu for layer in layers)
    net.train()
    with pytest.raises(RuntimeError, match="in-place operation"):
        net(**batch, labels=torch.tensor([0, 1])).loss.backward()


@pytest.mark.slow
@pytest.mark.parametrize("isa,library", [("avx512", "_C_AVX512"), ("avx2", "_C_AVX2")])
def test_vllm_pool_on_each_kernel_library_matches_hf(isa, library, qwen_model):
    pytest.importorskip("vllm")
    run = run_on(isa, "vllm-pool-probs", qwen_model)
    if torch.cpu._is_avx512_supported() or isa == "avx2":
        assert run["libraries"] == [library]
    net, tok = load_classifier(HFBackendConfig(model=str(qwen_model)), "cpu")
    from cpu_paths import TEXTS

    want = predict_probs(net, tok, TEXTS, 64, 2, "cpu")
    np.testing.assert_allclose(np.array(run["probs"]), want, atol=1e-4)
