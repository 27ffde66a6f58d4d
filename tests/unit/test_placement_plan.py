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


def cascade(*stage_resources):
    """Two hf stages, each with the resources given (None: the user set none)."""
    from clsjob.config import ClassifyConfig, validate

    stages = [{"backend": {"model": "small"}, "escalate_below": 0.9}, {"backend": {"model": "large"}}]
    for stage, resources in zip(stages, stage_resources):
        if resources is not None:
            stage["resources"] = resources
    return validate({"input": {"path": "in"}, "output": {"path": "out"},
                     "backend": {"kind": "cascade", "stages": stages}}, model=ClassifyConfig)


def cpus(cfg) -> list[float]:
    return [stage.resources.cpus_per_actor for stage in cfg.backend.stages]


def test_a_cpu_cascade_given_no_resources_splits_the_node_between_its_stages(caplog):
    import logging

    from clsjob.run.placement import size_cpu_stages
    from clsjob.run.resume import work_hash

    with caplog.at_level(logging.INFO, logger="clsjob"):
        sized = size_cpu_stages(cascade(None, None), [{"CPU": 16.0}, {"CPU": 8.0}])
    assert cpus(sized) == [7.0, 7.0]  # 16, less 1 for reading and writing, halved
    assert ("backend.stages[0] (1-hf), backend.stages[1] (2-hf) set no resources: on a CPU node "
            "of 16 CPUs, each runs 1 actor of 7 CPU(s)") in caplog.text
    assert placement_problems([{"CPU": 16.0}], *[classify_demand(s.resources) for s in sized.backend.stages]) == []
    # The local Ray clsjob starts on 2 cores has 3 logical CPUs: one each, as before.
    assert cpus(size_cpu_stages(cascade(None, None), [{"CPU": 3.0}])) == [1.0, 1.0]
    # A stage the user sized keeps its pool; the other takes what is left.
    assert cpus(size_cpu_stages(cascade({"actors": 2, "cpus_per_actor": 3}, None), [{"CPU": 16.0}])) == [3.0, 9.0]
    # GPUs anywhere, or every stage sized: the config as written.
    gpu = cascade(None, {"gpus_per_actor": 1})
    assert size_cpu_stages(gpu, [{"CPU": 16.0, "GPU": 1.0}]) is gpu
    assert size_cpu_stages(cascade(None, None), [{"CPU": 16.0, "GPU": 1.0}]).backend.stages[0].resources.cpus_per_actor == 1
    both = cascade({"cpus_per_actor": 2}, {"cpus_per_actor": 2})
    assert size_cpu_stages(both, [{"CPU": 16.0}]) is both
    # How many CPUs a stage's actors have writes no other row: a resumed run on another
    # cluster (or with other stage resources) is the same work.
    assert work_hash(sized) == work_hash(cascade(None, None)) == work_hash(both)


def test_a_cpu_cascade_whose_stages_work_is_known_splits_the_node_by_it(caplog):
    """distill knows each model's seconds a row and the share escalated: a teacher that does
    nearly all the work gets nearly all the CPUs (an even split left it half)."""
    import logging

    from clsjob.run.placement import size_cpu_stages

    with caplog.at_level(logging.INFO, logger="clsjob"):
        sized = size_cpu_stages(cascade(None, None), [{"CPU": 16.0}], work=[0.002, 0.06])
    assert cpus(sized) == [1.0, 14.0]  # 15 free: at least one each, the rest by the work
    assert "split by the CPU seconds a row is expected to bring each (0.002, 0.06): 1-hf 1 CPU(s), 2-hf 14 CPU(s)" in caplog.text
    assert placement_problems([{"CPU": 16.0}], *[classify_demand(s.resources) for s in sized.backend.stages]) == []
    # A bench's local Ray of 4 logical CPUs on 2 cores: the teacher 2, the student 1.
    assert cpus(size_cpu_stages(cascade(None, None), [{"CPU": 4.0}], work=[0.002, 0.06])) == [1.0, 2.0]
    # Equal work: what rounding leaves goes to the first of the heaviest.
    assert cpus(size_cpu_stages(cascade(None, None), [{"CPU": 16.0}], work=[1.0, 1.0])) == [8.0, 7.0]
    # A stage the user sized keeps its pool; the other takes what is left.
    assert cpus(size_cpu_stages(cascade({"cpus_per_actor": 3}, None), [{"CPU": 16.0}], work=[0.002, 0.06])) == [3.0, 12.0]
    # Nothing measured: evenly, as without work.
    assert cpus(size_cpu_stages(cascade(None, None), [{"CPU": 16.0}], work=[0.0, 0.0])) == [7.0, 7.0]


def test_the_busy_seconds_say_what_pool_they_ran_on():
    """What distill's split reads back: a single back end's CPUs an actor beside its model
    seconds; a cascade's are per stage (its CASCADE entries), so none for the run."""
    from clsjob.config import ClassifyConfig, validate
    from clsjob.run.summary import busy_summary

    single = validate({"input": {"path": "in"}, "output": {"path": "out"}, "backend": {"model": "m"},
                       "resources": {"actors": 2, "cpus_per_actor": 3}}, model=ClassifyConfig)
    assert busy_summary(12.0, 10.0, single) == {"model_s": 12.0, "share": 0.6, "cpus_per_actor": 3.0}
    assert busy_summary(12.0, 10.0, cascade({"cpus_per_actor": 3}, None))["cpus_per_actor"] is None
