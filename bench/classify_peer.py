"""The peer of clsjob's classifier back ends in bench/classify.py: Ray Data LLM's `classify`
task (`ray.data.llm.build_processor` over a `vLLMEngineProcessorConfig(task_type="classify")`),
the processor a Ray user reaches for instead of `hf` or `vllm_pool`, on the same model folder
and rows.

Set up as a user would for a sequence classifier: no chat template, the stage's own
tokenizer, no detokenizer, one engine (`concurrency=1`) in a placement bundle of the same
CPUs clsjob's actor gets, and the engine settings clsjob's `vllm_pool` uses on CPU. Its engine
runs torch on as many threads as its process's OMP_NUM_THREADS says; `EngineThreads` reads that
variable off the running engine process, so the report shows what the peer really got."""
from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ENGINE_STAGE = "vLLMEngineStageUDF"  # in the process title of the peer's engine actor


class EngineThreads:
    """While open, polls for the peer's engine process and records its OMP_NUM_THREADS."""

    def __init__(self, poll_s: float = 0.5):
        self.poll_s, self.seen, self._stop = poll_s, None, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "EngineThreads":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        import psutil

        while self.seen is None and not self._stop.wait(self.poll_s):
            for proc in psutil.process_iter(["cmdline"]):
                try:
                    if any(ENGINE_STAGE in part for part in proc.info["cmdline"] or []):
                        self.seen = proc.environ().get("OMP_NUM_THREADS", "unset")
                        return
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue


def peer_variant(folder: Path, shards: Path, n_rows: int, cpus: int, max_length: int,
                 batch_rows: int, keep_probs: dict | None):
    """A callable labelling every row of `shards` once through the peer; the first run's
    probabilities go into `keep_probs` (unless None), by the id clsjob derives for the row ("<shard>:<row>"),
    for the label check against clsjob's output."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from clsjob.backends.vllm_engine import engine_args
    from clsjob.config import VLLMPoolBackendConfig

    backend = VLLMPoolBackendConfig(model=str(folder), max_length=max_length,
                                    engine={"max_model_len": max_length,
                                            "enable_prefix_caching": False})
    kwargs = engine_args(backend, False, "pooling")
    for key in ("model", "runner"):  # given as model_source; the stage sets the runner itself
        kwargs.pop(key)
    config = vLLMEngineProcessorConfig(
        model_source=str(folder), task_type="classify", engine_kwargs=kwargs,
        batch_size=batch_rows, concurrency=1,
        placement_group_config={"bundles": [{"CPU": cpus}]},
        # Threads as clsjob's actor gets them (Ray sets OMP_NUM_THREADS to an actor's CPUs).
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cpus)}},
        chat_template_stage=False, tokenize_stage=True, detokenize_stage=False,
        log_engine_metrics=False)

    def run() -> dict:
        with EngineThreads() as threads:
            processor = build_processor(
                config, preprocess=lambda row: {"prompt": row["text"], "id": row["id"]},
                postprocess=lambda row: {"id": row["id"], "probs": row["embeddings"]})
            # Read here, not by read tasks: the peer's stage actors can take every logical CPU,
            # and a Parquet read task would then never be scheduled.
            blocks = [with_ids(pq.read_table(p), p.name) for p in sorted(shards.glob("*.parquet"))]
            rows = processor(ray.data.from_arrow(blocks)).take_all()
        assert len(rows) == n_rows, len(rows)
        if keep_probs is not None and not keep_probs:
            keep_probs.update({r["id"]: [float(x) for x in r["probs"]] for r in rows})
        return {"engine_omp_threads": threads.seen}
    return run


def with_ids(table: pa.Table, shard: str) -> pa.Table:
    return table.append_column("id", pa.array([f"{shard}:{i}" for i in range(table.num_rows)]))
