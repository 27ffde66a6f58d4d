"""Placement arithmetic: which jobs a cluster's nodes can run, and the message when not."""
from clsjob.config import ResourcesConfig, TrainingConfig
from clsjob.run.placement import classify_demand, describe, placement_problems, training_demand

TWO_CORES = [{"CPU": 2.0}]


def test_an_actor_holding_every_cpu_leaves_the_reader_no_slot():
    demand = classify_demand(ResourcesConfig(actors=1, cpus_per_actor=2))
    [problem] = placement_problems(TWO_CORES, demand)
    assert "take every CPU" in problem and "resources.cpus_per_actor" in problem
    # One logical CPU more, as clsjob gives a local Ray it starts, and it runs.
    assert demand.total_cpus() == 3
    assert placement_problems([{"CPU": 3.0}], demand) == []


def test_actors_must_fit_on_one_node_each():
    demand = classify_demand(ResourcesConfig(actors=3, cpus_per_actor=4, gpus_per_actor=1))
    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 48.0, "GPU": 4.0}, {"CPU": 4.0}]
    assert placement_problems(nodes, demand) == []
    [problem] = placement_problems([{"CPU": 8.0, "GPU": 1.0}, {"CPU": 64.0}], demand)
    assert problem.startswith("only 1 of 3 classifier actors fit, each needing 4 CPU + 1 GPU")
    assert "resources.gpus_per_actor" in problem


def test_no_gpu_anywhere():
    demand = training_demand(TrainingConfig(workers=2, use_gpu=True))
    [problem] = placement_problems([{"CPU": 16.0}], demand)
    assert "only 0 of 2 training workers fit" in problem and "training.use_gpu" in problem
    assert describe([{"CPU": 16.0}, {"CPU": 8.0, "GPU": 1.0}]) == "2 node(s): 16 CPU, 8 CPU + 1 GPU"
    assert describe([]) == "no nodes"


def test_fractional_shares():
    demand = classify_demand(ResourcesConfig(actors=4, cpus_per_actor=0.5, gpus_per_actor=0.25))
    assert placement_problems([{"CPU": 3.0, "GPU": 1.0}], demand) == []
    assert placement_problems([{"CPU": 2.0, "GPU": 1.0}], demand)  # nothing left to read with


def test_a_cascades_stages_are_placed_together():
    first = classify_demand(ResourcesConfig(actors=2, cpus_per_actor=2, gpus_per_actor=0.5),
                            "backend.stages[0].resources")
    second = classify_demand(ResourcesConfig(actors=1, cpus_per_actor=4, gpus_per_actor=1),
                             "backend.stages[1].resources")
    node = [{"CPU": 16.0, "GPU": 2.0}]
    assert placement_problems(node, first, second) == []
    # Each fits alone on one GPU; together they need two.
    [problem] = placement_problems([{"CPU": 16.0, "GPU": 1.0}], first, second)
    assert problem.startswith("only 0 of 1 classifier actors fit beside the stages before it")
    assert "backend.stages[1].resources.gpus_per_actor" in problem
    [problem] = placement_problems([{"CPU": 8.0, "GPU": 2.0}], first, second)
    assert "every stage together take every CPU" in problem and "backend.stages[0]" in problem
