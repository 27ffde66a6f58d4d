"""Memory as the input grows, and rows/s with 1 and 2 actors: does anything hold all rows?

The same job over 10,000 and 200,000 rows (short texts, a tiny random Qwen2 classifier so the
model costs little and the pipeline's own memory shows): the driver's peak RSS, and the peak
RSS of every classifier actor, sampled while the run goes. Then the 200,000-row input with 1
and 2 actors on this machine's cores.

    .venv/bin/python bench/memory.py [--sizes 10000 200000] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from common import REPO, Sampler, environment, environment_line, markdown_table, write_report
ROWS_PER_SHARD = 10_000
WORDS = "the film was a delight dull tedious card payment parcel arrived account reset".split()


def write_input(folder: Path, rows: int) -> None:
    import random

    rng = random.Random(0)
    folder.mkdir(parents=True)
    for shard, start in enumerate(range(0, rows, ROWS_PER_SHARD)):
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
                 for _ in range(min(ROWS_PER_SHARD, rows - start))]
        pq.write_table(pa.table({"text": texts}), folder / f"shard-{shard:04d}.parquet")


class ActorPeaks(Sampler):
    """Samples the RSS of every classifier actor process every 0.2 s; keeps each one's peak."""

    def __init__(self):
        super().__init__(every_s=0.2)
        self.peaks: dict[int, int] = {}

    def sample(self) -> None:
        for proc in psutil.process_iter(["cmdline"]):
            if "HFClassifier" in " ".join(proc.info["cmdline"] or []):
                try:
                    rss = proc.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)


def run(model: Path, inp: Path, out: Path, actors: int) -> dict:
    from clsjob.config import ClassifyConfig, validate
    from clsjob.run.pipeline import run_classify

    cfg = validate({"input": {"path": str(inp)},
                    "backend": {"model": str(model), "max_length": 64, "micro_batch_size": 64},
                    "resources": {"actors": actors},
                    "output": {"path": str(out), "keep_text": False, "rows_per_part": 2048}}, model=ClassifyConfig)
    started = time.monotonic()
    with ActorPeaks() as peaks:
        summary = run_classify(cfg)
    return {"rows": summary.rows_out, "actors": actors,
            "seconds": round(time.monotonic() - started, 1),
            "rows_per_s": round(summary.rows_out / (time.monotonic() - started), 1),
            "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "actor_peak_rss_mib": [round(v / 2**20, 1) for v in peaks.peaks.values()]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 200_000])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "memory.json"))
    args = parser.parse_args()
    env = environment()  # load average before this script adds its own
    import ray
    from tiny_models import build_qwen2_classifier

    ray.init(address="local", num_cpus=4, include_dashboard=False)  # readers/writers beside actors
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_qwen2_classifier(work / "model", ["negative", "neutral", "positive"])
        # Driver peak RSS only grows, so the sizes run smallest first: a flat line means the
        # larger input added nothing on the driver.
        for rows in sorted(args.sizes):
            write_input(work / f"in-{rows}", rows)
            results.append(run(model, work / f"in-{rows}", work / f"out-{rows}", actors=1))
            print(json.dumps(results[-1]), flush=True)
        largest = max(args.sizes)
        results.append(run(model, work / f"in-{largest}", work / f"out-{largest}-2", actors=2))
        print(json.dumps(results[-1]), flush=True)

    report = {"environment": env, "runs": results}
    table = markdown_table(
        ["rows", "actors", "s", "rows/s", "driver peak RSS MiB", "actor peak RSS MiB"],
        [[r["rows"], r["actors"], r["seconds"], r["rows_per_s"], r["driver_peak_rss_mib"],
          ", ".join(map(str, r["actor_peak_rss_mib"]))] for r in results])
    write_report(report, Path(args.out), f"\n{table}\n\n{environment_line(env)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
