"""One vLLM engine per actor, built from `backend.engine`; shared by vllm_prompt and vllm_pool.

vLLM is imported only inside these functions, after the environment is set: the variables
below are read when vLLM loads.
"""
from __future__ import annotations

import os

from clsjob.backends import require_cuda
from clsjob.config import VLLMPoolBackendConfig, VLLMPromptBackendConfig

CPU_KV_CACHE_GIB = 1.0
CPU_PROMPT_BLOCK_SIZE = 32


def prepare_env(use_gpu: bool) -> None:
    require_cuda(use_gpu)
    if not use_gpu:
        # On CPU, run the engine inside the actor's process: it starts in ~3 s instead of
        # 25-40 s with spawned engine processes, and uses the CPUs Ray gave the actor.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def engine_args(backend: VLLMPoolBackendConfig | VLLMPromptBackendConfig, use_gpu: bool,
                runner: str, hf_overrides: dict | None = None, seed: int = 0) -> dict:
    e = backend.engine
    args = {
        "model": backend.model, "runner": runner,
        "dtype": e.dtype if e.dtype != "auto" else ("bfloat16" if use_gpu else "float32"),
        "tensor_parallel_size": e.tensor_parallel_size,
        "pipeline_parallel_size": e.pipeline_parallel_size,
        # A classifier's rows share no prompt prefix, and vLLM refuses prefix caching for
        # encoder classifiers (BERT) outright; prompted rows share the whole prompt head.
        "enable_prefix_caching": e.enable_prefix_caching and runner == "generate",
        "enforce_eager": e.enforce_eager if e.enforce_eager is not None else not use_gpu,
        "trust_remote_code": backend.trust_remote_code, "seed": seed,
        "load_format": "safetensors",  # never unpickle .bin weights
    }
    if e.kv_cache_gib is not None or not use_gpu:
        # On CPU vLLM reads gpu_memory_utilization as a share of one NUMA node's memory,
        # which may not even hold the model; an explicit KV cache size is predictable.
        args["kv_cache_memory_bytes"] = int((e.kv_cache_gib or CPU_KV_CACHE_GIB) * 2**30)
    else:
        args["gpu_memory_utilization"] = e.gpu_memory_utilization
    if e.block_size or (runner == "generate" and not use_gpu):
        # vLLM's CPU default of 128 means a row's prompt shorter than that is never served
        # from the cache: whole-label scoring (one request per label-trie node) then pays the
        # full prompt per node, 5x slower on a 5-label set. 32 is the CPU kernels' smallest.
        args["block_size"] = e.block_size or CPU_PROMPT_BLOCK_SIZE
    if e.tensor_parallel_size * e.pipeline_parallel_size > 1:
        # The engine's workers go into the placement group the actor was scheduled in
        # (placement.actor_placement): one bundle, one GPU, per worker.
        args["distributed_executor_backend"] = "ray"
    if e.max_model_len:
        args["max_model_len"] = e.max_model_len
    if e.max_num_seqs:
        args["max_num_seqs"] = e.max_num_seqs
    if e.max_num_batched_tokens:
        args["max_num_batched_tokens"] = e.max_num_batched_tokens
    if runner == "generate":
        so = {"backend": e.structured_outputs_backend}
        if e.structured_outputs_backend in ("guidance", "xgrammar"):
            so["disable_any_whitespace"] = True  # compact JSON: fewer tokens, no runaway spaces
        args["structured_outputs_config"] = so
    if hf_overrides:
        args["hf_overrides"] = hf_overrides
    return args


def start_engine(args: dict):
    """The vLLM engine an actor holds for its lifetime (one per actor process)."""
    from vllm import LLM
    return LLM(**args)
