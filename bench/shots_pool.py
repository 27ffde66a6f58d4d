"""Where to embed a `select: similar` pool: once in every actor (what clsjob does), or once per
job and shipped to the actors through Ray's object store. Measured on a 10,003-row pool
(Banking77 train) with the embedders of `make models`.

    .venv/bin/python bench/shots_pool.py [--embedders minilm,mpnet] [--runs 3] [--out FILE.json]

Per embedder and run: the seconds one actor spends embedding the pool on this machine's CPUs
(`clsjob.embedder.Embedder`, as the actor runs it), and the seconds to ship the same vectors
instead: `ray.put` on the driver plus `ray.get` inside an actor on the same node (a remote
node adds the network copy: 10,003 x 384 float32 is 15.4 MB, x 768 is 30.7 MB). Runs
alternate the two, so drift in the machine's load hits both.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import DATA, REPO, environment, environment_line, markdown_table, model_folder, write_report


def pool_texts() -> list[str]:
    table = pq.read_table(DATA / "banking77.parquet", columns=["text", "split"])
    return table.filter(pc.equal(table.column("split"), "train")).column("text").to_pylist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedders", type=lambda v: v.split(","), default=["minilm", "mpnet"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "shots_pool.json")
    args = parser.parse_args()
    if not DATA.exists():
        print(f"no data at {DATA}: this benchmark reads ../shared/data", file=sys.stderr)
        return 2
    import ray

    from clsjob.embedder import Embedder

    env = environment()
    texts = pool_texts()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Receiver:
        def take(self, refs: list) -> float:
            started = time.perf_counter()
            vectors = ray.get(refs[0])  # zero-copy from the node's shared memory
            float(vectors[-1, -1])      # touched, so the read is not deferred
            return time.perf_counter() - started

    receiver = Receiver.remote()
    ray.get(receiver.take.remote([ray.put(np.zeros((1, 1), np.float32))]))  # actor started
    results = {}
    try:
        for name in args.embedders:
            started = time.perf_counter()
            embed = Embedder(str(model_folder(name)))
            load_s = time.perf_counter() - started
            embed_s, ship_s = [], []
            for _ in range(args.runs):
                started = time.perf_counter()
                vectors = embed(texts)
                embed_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                ref = ray.put(vectors)
                put_s = time.perf_counter() - started
                ship_s.append(put_s + ray.get(receiver.take.remote([ref])))
                del ref
            results[name] = {"pool_rows": len(texts), "dim": int(vectors.shape[1]),
                             "megabytes": round(vectors.nbytes / 1e6, 1), "load_s": round(load_s, 2),
                             "embed_s": [round(s, 2) for s in embed_s],
                             "ship_s": [round(s, 4) for s in ship_s],
                             "embed_over_ship": round(min(embed_s) / max(ship_s), 1)}
            print(results[name], flush=True)
    finally:
        ray.shutdown()
    rows = [[name, r["pool_rows"], r["megabytes"], r["load_s"],
             f"{min(r['embed_s']):.1f}–{max(r['embed_s']):.1f}",
             f"{min(r['ship_s']) * 1e3:.0f}–{max(r['ship_s']) * 1e3:.0f}", r["embed_over_ship"]]
            for name, r in results.items()]
    write_report({"environment": env, "args": {"embedders": args.embedders, "runs": args.runs},
                  "results": results}, args.out, "\n".join([
        markdown_table(["embedder", "pool rows", "MB", "load s", "embed s (per actor)",
                        "ship ms (put + get)", "embed / ship (worst case)"], rows),
        f"\n{args.runs} runs each; {environment_line(env)}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
