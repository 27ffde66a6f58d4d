"""Where a job's actors (classify) or workers (fine-tune) go, checked before work is scheduled.

Ray never says that a request can never be met: an actor that asks for more than any node
has, or actors that leave no CPU for the shard reader and part writer, just wait, and the job
hangs with no error. So the driver sizes a local Ray it starts itself to fit the job, refuses
at start a job the cluster cannot place (naming the `resources.*` keys and what the nodes
have), and while the job runs says what it is waiting for when nothing lands for a while.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from functools import partial

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from clsjob.config import CASCADE, ClassifyConfig, engine_gpus

log = logging.getLogger("clsjob")
# The shard reader and the part writer are Ray tasks of one logical CPU each, I/O-light; they
# take turns, so one CPU beside the classifier actors is enough for them to make progress.
IO_CPUS = 1.0


class PlacementError(RuntimeError):
    """The cluster cannot run this job as configured; the message names the keys to change."""


@dataclass(frozen=True)
class Demand:
    what: str          # "classifier actor" | "training worker"
    count: int
    cpus: float        # per actor / worker, on one node
    gpus: float
    keys: str          # the config keys that set these numbers, for messages
    io_cpus: float = 0.0  # logical CPUs that must stay free beside them

    def total_cpus(self) -> float:
        return self.count * self.cpus + self.io_cpus

    def each(self) -> str:
        """What one actor or worker asks for, as messages say it."""
        return f"{self.cpus:g} CPU" + (f" + {self.gpus:g} GPU" if self.gpus else "")


def classify_demand(resources, key: str = "resources") -> Demand:
    # An autoscaling pool must fit its min at start; Ray Data adds actors up to its max only
    # where they fit. `key`: where the pool is configured (a cascade's stages have their own).
    return Demand("classifier actor", resources.actor_range()[0], resources.cpus_per_actor,
                  resources.gpus_per_actor,
                  f"{key}.actors / {key}.cpus_per_actor / {key}.gpus_per_actor",
                  io_cpus=IO_CPUS)


def actor_placement(backend, resources) -> dict:
    """The Ray Data map_batches arguments that place one classifier actor of `backend` with
    `resources` (a config's own, or a cascade stage's).

    GPUs are asked for per actor (`ray_remote_args_fn`, called as each actor starts), never
    as map_batches' num_gpus: Ray Data refuses num_gpus unless batches have a fixed row count,
    and fixed-size batches would cut a chunk that ends a shard together with the next one,
    so a part could no longer be written whole. An engine spanning several GPUs (tensor or
    pipeline parallel) gets a placement group of one bundle per GPU, as ray.data.llm does:
    vLLM's workers each need one, and they start inside the group."""
    r = resources
    if not r.gpus_per_actor:
        return {"num_cpus": r.cpus_per_actor}
    spans = engine_gpus(backend) or 1
    ask = (partial(engine_placement_group, spans, r.cpus_per_actor) if spans > 1
           else partial(actor_gpus, r.gpus_per_actor))
    return {"num_cpus": r.cpus_per_actor, "num_gpus": 0, "ray_remote_args_fn": ask}


def actor_gpus(gpus: float) -> dict:
    return {"num_gpus": gpus}


def engine_bundles(gpus: int, cpus: float) -> list[dict]:
    """The actor and its engine's first worker share the first bundle; the other workers
    (vLLM's ask for a GPU and no CPU) take one GPU each."""
    return [{"GPU": 1, "CPU": cpus}] + [{"GPU": 1} for _ in range(gpus - 1)]


def engine_placement_group(gpus: int, cpus: float) -> dict:
    # STRICT_PACK: tensor-parallel workers exchange activations every layer; over the
    # network instead of NVLink they would be slower than one GPU.
    group = ray.util.placement_group(engine_bundles(gpus, cpus), strategy="STRICT_PACK")
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        group, placement_group_capture_child_tasks=True)}


def training_demand(training) -> Demand:
    return Demand("training worker", training.workers, training.cpus_per_worker,
                  1.0 if training.use_gpu else 0.0,
                  "training.workers / training.cpus_per_worker / training.use_gpu")


def size_cpu_stages(cfg: ClassifyConfig, nodes: list[dict], work: list[float] | None = None) -> ClassifyConfig:
    """A cascade on CPU nodes whose stages the user gave no `resources`: the largest node's
    CPUs (less the reader's and writer's, and what the stages the user sized take) split
    between those stages, one actor each, and said in the log. The default of one CPU a stage
    leaves most of a large node idle, and actors that each take every core oversubscribe it
    (torch runs a thread per CPU Ray gives the actor: OMP_NUM_THREADS). Evenly, because which
    stage does more work depends on the share escalated, known only once the rows run —
    unless the caller knows it: `work`, per stage, the CPU seconds a corpus row is expected
    to bring it (distill measured both models and the share escalated), splits them in
    proportion, at least one CPU each. Unchanged where any stage or node has GPUs."""
    backend = cfg.backend
    if backend.kind != CASCADE or any(n.get("GPU") for n in nodes):
        return cfg
    unset = [i for i, s in enumerate(backend.stages) if "resources" not in s.model_fields_set]
    if not unset or any(s.resources.gpus_per_actor for s in backend.stages):
        return cfg
    node_cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    taken = sum(s.resources.actor_range()[0] * s.resources.cpus_per_actor
                for i, s in enumerate(backend.stages) if i not in unset)
    free = node_cpus - IO_CPUS - taken
    names = backend.stage_names()
    weights = [work[i] for i in unset] if work else None
    if weights and (min(weights) < 0 or not sum(weights)):
        weights = None  # nothing measured: evenly
    if weights:
        share = split_by_work(free, weights)
        log.info("cascade: %s set no resources: on a CPU node of %g CPUs, split by the CPU "
                 "seconds a row is expected to bring each (%s): %s, 1 actor each, %g CPU kept for "
                 "reading and writing; set backend.stages[i].resources to choose",
                 ", ".join(f"backend.stages[{i}] ({names[i]})" for i in unset), node_cpus,
                 ", ".join(f"{w:.3g}" for w in weights),
                 ", ".join(f"{names[i]} {n} CPU(s)" for i, n in zip(unset, share)), IO_CPUS)
    else:
        share = [max(1, math.floor(free / len(unset)))] * len(unset)
        log.info("cascade: %s set no resources: on a CPU node of %g CPUs, each runs 1 actor of %d "
                 "CPU(s) (as many torch threads), %g CPU kept for reading and writing; set "
                 "backend.stages[i].resources to choose", ", ".join(
                     f"backend.stages[{i}] ({names[i]})" for i in unset), node_cpus, share[0], IO_CPUS)
    sized = dict(zip(unset, share))
    stages = [s.model_copy(update={"resources": s.resources.model_copy(update={"cpus_per_actor": float(sized[i])})})
              if i in sized else s for i, s in enumerate(backend.stages)]
    return cfg.model_copy(update={"backend": backend.model_copy(update={"stages": stages})})


def split_by_work(free: float, weights: list[float]) -> list[int]:
    """`free` CPUs in proportion to `weights`, at least one each; what rounding leaves goes to
    the heaviest."""
    total = sum(weights)
    share = [max(1, math.floor(free * w / total)) for w in weights]
    share[weights.index(max(weights))] += max(0, math.floor(free) - sum(share))
    return share


def ensure_ray(*demands: Demand) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`) or the one `ray start`
    began on this machine; otherwise start a local Ray with enough logical CPUs for all of
    `demands` at once (a cascade's stages run side by side). A caller that already
    initialised Ray keeps its own."""
    if ray.is_initialized():
        return
    cores = os.cpu_count() or 1
    demand = demands[0] if demands else None
    wanted = sum(d.count * d.cpus for d in demands) + max((d.io_cpus for d in demands), default=0)
    cpus = max(cores, math.ceil(wanted))
    try:
        # Starts a local Ray unless there is one to join; Ray refuses num_cpus for a cluster
        # it joins, before connecting, and that refusal is the only sign of which it is.
        ray.init(num_cpus=cpus, log_to_driver=True, runtime_env=OWN_CLUSTER)
    except ValueError:
        ray.init(log_to_driver=True)
        return
    if cpus > cores:
        # Logical CPUs are a scheduling unit, not cores: the reader and writer are I/O-light
        # and must get a slot beside actors that use every core for their torch threads.
        log.info("started a local Ray with %d logical CPUs on %d cores: %d %s(s) x %g CPU "
                 "+ %g for reading and writing", cpus, cores, demand.count, demand.what,
                 demand.cpus, demand.io_cpus)


def address_own_cluster() -> None:
    """Every worker process of a local Ray clsjob starts names that Ray as its own.

    Ray Train's PlacementGroupCleaner actor asks the state API whether the training
    controller lives, with no address: Ray then looks for the clusters on this machine. With
    a second one there (another job, a test session) it either fails ("Found multiple active
    Ray instances": its monitor thread dies with a traceback in the driver's log) or asks the
    other cluster, hears "no such actor", and removes the live run's placement group: the
    training worker is killed mid-epoch and the attempt lost (seen in a benchmark). Named,
    it queries the right cluster."""
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


# The runtime env of every local Ray started for clsjob's work: by ensure_ray, and by the
# tests and benchmarks that start their own.
OWN_CLUSTER = {"worker_process_setup_hook": "clsjob.run.placement.address_own_cluster"}


def placement_problems(nodes: list[dict], demand: Demand, *more: Demand) -> list[str]:
    """Why `demand` (and `more`, placed after it on what it leaves: a cascade's stages share
    the nodes) cannot run on nodes with these resources ({"CPU": n, "GPU": m}); none when it
    can. Placed greedily, node by node, as Ray's packing would at best."""
    free = [[node.get("CPU", 0.0), node.get("GPU", 0.0)] for node in nodes]
    for d in (demand, *more):
        placed = 0
        for node in free:
            fits = min(node[0] // d.cpus if d.cpus else math.inf,
                       node[1] // d.gpus if d.gpus else math.inf)
            take = int(min(fits, d.count - placed))
            placed += take
            node[0] -= take * d.cpus
            node[1] -= take * d.gpus
        if placed < d.count:
            beside = " beside the stages before it" if d is not demand else ""
            return [f"only {placed} of {d.count} {d.what}s fit{beside}, each needing {d.each()} "
                    f"on one node ({d.keys})"]
    io_cpus = max(d.io_cpus for d in (demand, *more))
    if sum(node[0] for node in free) >= io_cpus:
        return []
    if not more:
        return [f"the {demand.count} {demand.what}s ({demand.each()} each) take every CPU, leaving "
                f"none of the {io_cpus:g} the shard reader and part writer need ({demand.keys})"]
    return [f"the actors of every stage together take every CPU, leaving none of the {io_cpus:g} "
            f"the shard reader and part writer need ({'; '.join(d.keys for d in (demand, *more))})"]


def describe(nodes: list[dict]) -> str:
    if not nodes:
        return "no nodes"
    parts = [f"{n.get('CPU', 0):g} CPU" + (f" + {n['GPU']:g} GPU" if n.get("GPU") else "")
             for n in nodes]
    return f"{len(nodes)} node(s): " + ", ".join(parts)


def alive_nodes() -> list[dict]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def check_placement(demand: Demand | list[Demand], autoscaling: bool) -> None:
    """Refuse a job the cluster's nodes cannot place (a list: a cascade's stages, all at
    once), or on an autoscaling cluster say that it waits for nodes."""
    nodes = alive_nodes()
    problems = placement_problems(nodes, *(demand if isinstance(demand, list) else [demand]))
    if not problems:
        return
    message = f"{problems[0]}; the cluster has {describe(nodes)}"
    if autoscaling:
        log.warning("%s; waiting for the autoscaler to add nodes (cluster.autoscaling)", message)
        return
    raise PlacementError(f"{message}. Lower those settings, add nodes, or set "
                         f"cluster.autoscaling: true if the cluster adds nodes on demand")


class StallReporter:
    """While the job runs: when no part has landed for `after_s` seconds, log what the job is
    waiting for (resources it asked for that are not free, or a chunk still being labelled),
    and again every `after_s` seconds until something lands."""

    def __init__(self, demand: Demand, stage: str, after_s: float = 120.0, poll_s: float = 5.0):
        self.demand, self.stage, self.after_s, self.poll_s = demand, stage, after_s, poll_s
        self.last = self.reported = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="clsjob-stall", daemon=True)

    def __enter__(self) -> "StallReporter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll_s + 1)

    def beat(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            if now - self.last >= self.after_s and now - self.reported >= self.after_s:
                self.reported = now
                log.warning("%s: nothing finished for %.0f s; %s", self.stage, now - self.last,
                            self.waiting_for())

    def waiting_for(self) -> str:
        try:
            free, total = ray.available_resources(), ray.cluster_resources()
        except Exception as exc:  # the report must never take the job down
            return f"cluster state unavailable ({exc})"
        d = self.demand
        have = (f"free now: {free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPU"
                + (f", {free.get('GPU', 0):g} of {total.get('GPU', 0):g} GPU" if d.gpus else ""))
        return (f"{d.count} {d.what}(s) asked for {d.each()} each ({d.keys}) plus "
                f"{d.io_cpus:g} CPU for reading and writing; {have}. If the CPUs are taken, a "
                f"task or actor is waiting for a slot; if not, a chunk is still being labelled")
