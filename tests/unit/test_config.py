from datetime import date
from pathlib import Path

import pytest
import yaml

from clsjob.config import (ClassifyConfig, ConfigError, DistillConfig, FinetuneConfig, MergeConfig,
                           apply_overrides, config_hash, load_config, validate)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
KIND = {"classify": ClassifyConfig, "finetune": FinetuneConfig, "merge": MergeConfig,
        "distill": DistillConfig}


def minimal(tmp_path, **extra) -> Path:
    data = {"input": {"path": "in/"}, "backend": {"model": "m"}, "output": {"path": "out/"}, **extra}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    model = KIND[path.stem.split("-")[0]]
    cfg = load_config(path, model=model, day=date(2026, 11, 29))  # for the nightly's {date}
    assert isinstance(cfg, model)


def test_every_shipped_config_is_run_by_a_test():
    """Loading is not enough: a default that does not run cannot ship. Each file in configs/
    must be named (as a quoted file name) by an integration test that runs it."""
    tests = "".join(p.read_text() for p in (CONFIGS.parent / "tests" / "integration").glob("*.py"))
    unrun = [p.name for p in CONFIGS.glob("*.yaml") if f'"{p.name}"' not in tests]
    assert not unrun, f"shipped configs no test runs: {unrun}"


def test_shipped_configs_cover_every_command():
    assert {p.stem.split("-")[0] for p in CONFIGS.glob("*.yaml")} == set(KIND)


def test_defaults_and_label_strings(tmp_path):
    cfg = load_config(minimal(tmp_path, labels=["neg", {"name": "pos", "description": "good"}]),
                      model=ClassifyConfig)
    assert cfg.input.text_column == "text" and cfg.input.id_column is None
    assert cfg.backend.kind == "hf" and cfg.backend.max_length == 512
    assert [l.name for l in cfg.labels] == ["neg", "pos"]
    assert cfg.labels[1].description == "good"


def test_unknown_key_is_named(tmp_path):
    path = minimal(tmp_path, backend={"model": "m", "max_lenght": 12})
    with pytest.raises(ConfigError, match=r"backend\.max_lenght: unknown key"):
        load_config(path, model=ClassifyConfig)


def test_bad_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"resources\.cpus_per_actor: .*greater than 0"):
        load_config(minimal(tmp_path), ["resources.cpus_per_actor=0"], model=ClassifyConfig)
    with pytest.raises(ConfigError, match=r"backend\.kind"):
        load_config(minimal(tmp_path), ["backend.kind=bananas"], model=ClassifyConfig)


def test_each_back_end_accepts_only_its_own_settings(tmp_path):
    # kind left out is hf, which has no prompt; the error names the key and the back end.
    with pytest.raises(ConfigError, match=r"backend\.prompt: unknown key for backend.kind hf"):
        load_config(minimal(tmp_path), ["backend.prompt.mode=json"], model=ClassifyConfig)
    with pytest.raises(ConfigError, match=r"backend\.micro_batch_size: unknown key for "
                                          r"backend.kind vllm_pool"):
        load_config(minimal(tmp_path), ["backend.kind=vllm_pool", "backend.micro_batch_size=8"],
                    model=ClassifyConfig)
    with pytest.raises(ConfigError, match=r"backend\.kind: 'bananas' is not a back end "
                                          r"\(one of hf, vllm_pool, vllm_prompt\)"):
        load_config(minimal(tmp_path), ["backend.kind=bananas"], model=ClassifyConfig)
    cfg = load_config(minimal(tmp_path, labels=["a", "b"]),
                      ["backend.kind=vllm_prompt", "backend.prompt.mode=json"], model=ClassifyConfig)
    assert type(cfg.backend).__name__ == "VLLMPromptBackendConfig" and cfg.backend.prompt.mode == "json"


def test_gpus_per_actor_must_match_what_the_back_end_can_use(tmp_path):
    def load(*sets):
        return load_config(minimal(tmp_path, labels=["a"]), list(sets), model=ClassifyConfig)

    with pytest.raises(ConfigError, match=r"resources.gpus_per_actor 1 contradicts "
                       r"backend.engine.tensor_parallel_size 2 x backend.engine."
                       r"pipeline_parallel_size 1 = 2 GPUs per engine; set resources.gpus_per_actor: 2"):
        load("backend.kind=vllm_pool", "backend.engine.tensor_parallel_size=2",
             "resources.gpus_per_actor=1")
    with pytest.raises(ConfigError, match=r"gpus_per_actor 0 contradicts .* = 4 GPUs"):
        load("backend.kind=vllm_prompt", "backend.engine.tensor_parallel_size=2",
             "backend.engine.pipeline_parallel_size=2")
    with pytest.raises(ConfigError, match=r"gpus_per_actor 2 but .* = 1 GPU per engine; set "
                                          r"backend.engine.tensor_parallel_size: 2"):
        load("backend.kind=vllm_pool", "resources.gpus_per_actor=2")
    with pytest.raises(ConfigError, match=r"gpus_per_actor 2: backend.kind hf runs one model "
                                          r"copy on one GPU; use resources.actors"):
        load("resources.gpus_per_actor=2")
    assert load("backend.kind=vllm_pool", "backend.engine.tensor_parallel_size=2",
                "resources.gpus_per_actor=2").resources.gpus_per_actor == 2
    assert load("resources.gpus_per_actor=0.5").resources.gpus_per_actor == 0.5  # two per GPU


def test_actors_is_a_count_or_a_range(tmp_path):
    from clsjob.run.placement import classify_demand
    from clsjob.run.stages import actor_pool

    cfg = load_config(minimal(tmp_path), ["resources.actors=[1, 4]"], model=ClassifyConfig)
    assert cfg.resources.actor_range() == (1, 4)
    pool = actor_pool(cfg.resources)
    assert (pool.min_size, pool.max_size) == (1, 4)
    assert classify_demand(cfg.resources).count == 1  # the job starts once min fit
    fixed = load_config(minimal(tmp_path), ["resources.actors=3"], model=ClassifyConfig)
    assert (actor_pool(fixed.resources).min_size, actor_pool(fixed.resources).max_size) == (3, 3)
    for bad in ("[3, 2]", "[0, 2]", "0", "[1, 2, 3]"):
        with pytest.raises(ConfigError, match=r"resources.actors: .*expected N or \[min, max\] "
                                              r"with 0 < min <= max"):
            load_config(minimal(tmp_path), [f"resources.actors={bad}"], model=ClassifyConfig)


def test_the_registry_has_every_back_end_the_config_accepts():
    from clsjob.backends import REGISTRY, resolve
    from clsjob.config import BACKEND_CONFIGS, BACKEND_KINDS

    assert set(REGISTRY) == set(BACKEND_KINDS)
    for kind, entry in REGISTRY.items():
        assert entry.config in BACKEND_CONFIGS and entry.config.model_fields["kind"].default == kind
        assert callable(resolve(entry.check))  # names that resolve (imports torch, not vLLM)
        module, _, name = entry.actor.partition(":")
        # The actor's module imports vLLM lazily, but reading it is enough to find the class.
        source = (CONFIGS.parent / Path(*module.split("."))).with_suffix(".py").read_text()
        assert f"\nclass {name}:" in source


def test_missing_required_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"input": {"path": "x"}, "backend": {"model": "m"}}))
    with pytest.raises(ConfigError, match=r"c\.yaml.*\n\s+output: Field required"):
        load_config(path, model=ClassifyConfig)


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(minimal(tmp_path), [
        "output.rows_per_part=64", "input.carry_columns=[a, b]", "output.keep_text=false",
        "input.path=s3://b/k/"], model=ClassifyConfig)
    assert cfg.output.rows_per_part == 64
    assert cfg.input.carry_columns == ["a", "b"]
    assert cfg.output.keep_text is False
    assert cfg.input.path == "s3://b/k/"


def test_renamed_key_still_loads_with_a_warning_naming_both(tmp_path, caplog):
    cfg = load_config(minimal(tmp_path, resources={"actors": 2, "batch_size": 256}),
                      model=ClassifyConfig)
    assert cfg.output.rows_per_part == 256 and cfg.resources.actors == 2
    assert "resources.batch_size is deprecated, renamed output.rows_per_part" in caplog.text
    # The same run whichever name the file used: the work hash sees only the new key.
    new = load_config(minimal(tmp_path, resources={"actors": 2}), ["output.rows_per_part=256"],
                      model=ClassifyConfig)
    assert new == cfg
    with pytest.raises(ConfigError, match=r"resources.batch_size \(8\) is the old name of "
                                          r"output.rows_per_part \(16\); set only output.rows_per_part"):
        load_config(minimal(tmp_path), ["resources.batch_size=8", "output.rows_per_part=16"],
                    model=ClassifyConfig)


def test_override_errors():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["nothing"])
    with pytest.raises(ConfigError, match="'a' is not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", model=ClassifyConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, model=ClassifyConfig)


def test_parts_per_call_defaults_by_device_and_the_users_value_wins(tmp_path):
    from clsjob.run.resume import work_hash

    def load(*sets):
        return load_config(minimal(tmp_path), list(sets), model=ClassifyConfig)

    assert load().parts_per_call() == 1
    assert load("resources.gpus_per_actor=1").parts_per_call() == 8
    assert load("resources.gpus_per_actor=1", "output.parts_per_call=2").parts_per_call() == 2
    assert load("output.parts_per_call=4").parts_per_call() == 4
    with pytest.raises(ConfigError, match="output.parts_per_call"):
        load("output.parts_per_call=0")
    # Which parts share a call changes no part: a rerun with another value resumes.
    assert work_hash(load("output.parts_per_call=4")) == work_hash(load())


def test_config_is_frozen_and_hash_follows_content(tmp_path):
    a = load_config(minimal(tmp_path), model=ClassifyConfig)
    b = load_config(minimal(tmp_path), ["resources.batch_size=7"], model=ClassifyConfig)
    with pytest.raises(Exception):
        a.resources.actors = 3
    assert config_hash(a) == config_hash(load_config(minimal(tmp_path), model=ClassifyConfig))
    assert config_hash(a) != config_hash(b)


def test_finetune_requires_gold_labels():
    with pytest.raises(ConfigError, match="train.*label_column is required"):
        load_config(None, ["base_model=m", "train.path=t", "output.path=o"], model=FinetuneConfig)


def test_training_arguments_follow_the_hardware(tmp_path):
    import torch

    from clsjob.finetune.trainer import training_arguments

    cfg = load_config(None, ["base_model=m", "train.path=t", "train.label_column=y",
                             "output.path=o", "training.use_gpu=true", "training.warmup_ratio=0.1"],
                      model=FinetuneConfig)
    args = training_arguments(cfg, str(tmp_path), has_eval=True)
    cuda = torch.cuda.is_available()
    assert args.use_cpu is (not cuda) and args.bf16 is (cuda and torch.cuda.is_bf16_supported())
    assert args.eval_strategy == "epoch" and args.save_strategy == "epoch"
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 0.1
    assert training_arguments(cfg, str(tmp_path), has_eval=False).eval_strategy == "no"


def test_date_templates_fill_every_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "input": {"path": ["s3://b/events/{date}/", "s3://b/late/{date:%Y/%m/%d}/*.parquet"]},
        "backend": {"model": "m"}, "output": {"path": "s3://b/labelled/day={date:%Y%m%d}"}}))
    cfg = load_config(path, model=ClassifyConfig, day=date(2026, 11, 29))
    assert cfg.input.path == ["s3://b/events/2026-11-29/", "s3://b/late/2026/11/29/*.parquet"]
    assert cfg.output.path == "s3://b/labelled/day=20261129"
    # The same file without a date is refused, naming the key, rather than run on '{date}'.
    with pytest.raises(ConfigError, match=r"output.path: .* holds a date template; pass --date"):
        load_config(path, ["input.path=in/"], model=ClassifyConfig)
    # Strings without a template are left alone, braces and all.
    cfg = load_config(minimal(tmp_path), ["output.path=out/{x}"], model=ClassifyConfig)
    assert cfg.output.path == "out/{x}"


def test_config_reference_lists_every_setting_with_default_and_meaning(capsys):
    from clsjob.cli import main
    from clsjob.config import field_reference

    rows = {key: (default, text) for key, default, text in field_reference(ClassifyConfig)}
    assert rows["input.path"][0] == "required" and rows["cluster.autoscaling"][0] == "false"
    assert rows["output.rows_per_part"][0] == "1024" and rows["input.carry_columns"][0] == "[]"
    assert "resources.batch_size" not in rows
    assert "backend.prompt.examples" in rows  # a list of sections is one setting
    for model in KIND.values():
        undocumented = [k for k, _, text in field_reference(model) if not text]
        assert not undocumented, f"{model.__name__}: no description for {undocumented}"
    assert main(["config", "finetune"]) == 0
    out = capsys.readouterr().out
    assert "training.quantization" in out and "nf4" in out and "cluster.stall_report_s" in out


def test_readme_names_every_setting():
    """The README's configuration tables are written by hand: a setting added to a config
    model without a word in the README fails here (`clsjob config` prints them all)."""
    from clsjob.config import field_reference

    readme = (CONFIGS.parent / "README.md").read_text()
    for model in KIND.values():
        for key, _, _ in field_reference(model):
            leaf = key.split(".")[-1]
            assert any(s in readme for s in (f"`{key}`", f"`{leaf}`", f".{leaf}`")), key


def test_multilabel_settings_that_cannot_work_are_refused_naming_the_key(tmp_path):
    def load(*sets):
        return load_config(minimal(tmp_path, labels=["a", "b"]), ["task=multi_label", *sets],
                           model=ClassifyConfig)

    assert load().task == "multi_label" and load("input.label_separator=;").input.label_separator == ";"
    with pytest.raises(ConfigError, match=r"backend.prompt.mode choice forces exactly one label"):
        load("backend.kind=vllm_prompt")
    assert load("backend.kind=vllm_prompt", "backend.prompt.mode=score").backend.prompt.mode == "score"
    with pytest.raises(ConfigError, match=r"abstain is not supported with task: multi_label"):
        load("abstain.below=0.5")
    with pytest.raises(ConfigError, match=r"output.review.strategy margin \(least_confident is\) "
                                          r"is not supported with task: multi_label"):
        load("output.review.rows=5", "output.review.strategy=margin")
    with pytest.raises(ConfigError, match=r"output.review.per_label is not supported"):
        load("output.review.rows=5", "output.review.per_label=true")
    assert load("output.review.rows=5").output.review.rows == 5
    with pytest.raises(ConfigError, match=r"input.label_separator applies to task: multi_label only"):
        load_config(minimal(tmp_path, labels=["a"]), ["input.label_separator=;"], model=ClassifyConfig)
    with pytest.raises(ConfigError, match=r"backend.prompt.examples\[0\].label: a list of labels is "
                                          r"for task: multi_label"):
        load_config(minimal(tmp_path, labels=["a", "b"]),
                    ["backend.kind=vllm_prompt", "backend.prompt.examples=[{text: t, label: [a, b]}]"],
                    model=ClassifyConfig)
    with pytest.raises(ConfigError, match=r"train.label_separator applies to task: multi_label only"):
        validate({"base_model": "m", "train": {"path": "t", "label_column": "y", "label_separator": "|"},
                  "output": {"path": "o"}}, model=FinetuneConfig)


def test_a_distance_index_is_for_single_label_fine_tunes():
    cfg = {"base_model": "m", "train": {"path": "t", "label_column": "label"},
           "training": {"distance_index_rows": 1000}, "output": {"path": "o"}}
    assert validate(cfg, model=FinetuneConfig).training.distance_index_rows == 1000
    with pytest.raises(Exception, match="training.distance_index_rows is for task: single_label"):
        validate({**cfg, "task": "multi_label"}, model=FinetuneConfig)
