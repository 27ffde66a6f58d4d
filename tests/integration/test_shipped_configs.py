"""Every shipped classify config that runs without vLLM, run at tiny scale through Ray Data
(the vLLM ones are in test_vllm.py, the fine-tune and merge ones in test_model_families.py)."""
from __future__ import annotations

import json
from datetime import date

from clsjob.run.pipeline import run_classify
from helpers import LABELS, check_output_contract, sample_texts, shipped_classify, write_shards
from tiny_models import build_bert_classifier

INTENTS = ["account", "billing", "delivery", "product"]


def test_classify_hf_yaml(qwen_model, ray_cluster, tmp_path):
    write_shards(tmp_path / "in", [{"text": sample_texts(30) + [None, ""]}])
    summary = run_classify(shipped_classify("classify-hf.yaml", qwen_model, tmp_path))
    rows = check_output_contract(summary, tmp_path / "out", 32, errored=2)
    assert {r["label"] for r in rows if r["error"] is None} <= set(LABELS)


def test_classify_nightly_yaml_for_one_day(qwen_model, ray_cluster, tmp_path):
    day = date(2026, 11, 29)
    write_shards(tmp_path / "events" / "2026-11-29", [{"text": sample_texts(20)}])
    cfg = shipped_classify("classify-nightly.yaml", qwen_model, tmp_path,
                           f"input.path={tmp_path}/events/{{date}}/",
                           f"output.path={tmp_path}/labelled/date={{date:%Y%m%d}}/",
                           f"monitor.baseline={tmp_path}/labelled/date={{date-1:%Y%m%d}}/", day=day)
    assert cfg.monitor.baseline == f"{tmp_path}/labelled/date=20261128/"  # the day before
    summary = run_classify(cfg)
    out = tmp_path / "labelled" / "date=20261129"
    check_output_contract(summary, out, 20, errored=0)
    # The first night has no day before it: recorded as not compared, never fatal.
    assert json.loads((out / "_manifest.json").read_text())["drift"]["why"] == "no manifest"


def test_classify_local_eval_yaml(ray_cluster, tmp_path):
    model = build_bert_classifier(tmp_path / "model", INTENTS)
    write_shards(tmp_path / "in", [{"text": sample_texts(24),
                                    "label": [INTENTS[i % 4] for i in range(24)]}])
    # As shipped, but one CPU: the session's Ray is shared with the other tests.
    summary = run_classify(shipped_classify("classify-local-eval.yaml", model, tmp_path))
    rows = check_output_contract(summary, tmp_path / "out", 24, errored=0)
    assert {r["gold"] for r in rows} == set(INTENTS)
    metrics = json.loads((tmp_path / "out" / "_metrics.json").read_text())
    assert metrics["rows_scored"] == 24 and 0 <= metrics["accuracy"] <= 1


def test_the_configs_the_demo_writes(ray_cluster, tmp_path):
    """`make demo` runs them on the real MiniLM; here on a tiny BERT of the same family."""
    import pyarrow.parquet as pq

    from clsjob.demo import demo_configs, sample_corpus
    from clsjob.finetune.merge import merge
    from clsjob.finetune.train import run_finetune
    from tiny_models import build_base

    for split, table in sample_corpus(rows_per_label=40).items():
        (tmp_path / "data" / split).mkdir(parents=True)
        pq.write_table(table, tmp_path / "data" / split / "part-0.parquet")
    finetune, merge_cfg, classify = demo_configs(tmp_path, build_base(tmp_path / "base", "bert"))
    assert run_finetune(finetune)["train_rows"] == 120
    merge(merge_cfg)
    summary = run_classify(classify)
    check_output_contract(summary, tmp_path / "output", 43, errored=3)
    assert summary.metrics["rows_scored"] == 40
