"""The cascade's pure parts: which rows go on, how a later stage's rows are put back, what the
write stage counts per stage, and the config's refusals."""
import numpy as np
import pyarrow as pa
import pytest

from clsjob.config import ClassifyConfig, validate
from clsjob.contract import LABELLED_BY, RESULT_FIELDS
from clsjob.run.cascade import (FIRST_LABEL, add_counts, busy_column, cascade_summary, escalated, merge_rows,
                                ran_column, stage_counts)


def labelled(confidence, probs, error=None, label=None):
    n = len(confidence)
    return pa.table({"label": pa.array(label or ["a"] * n, pa.string()),
                     "confidence": pa.array(confidence, RESULT_FIELDS["confidence"]),
                     "probs": pa.array(probs, RESULT_FIELDS["probs"]),
                     "error": pa.array(error or [None] * n, pa.string())})


def test_rows_under_the_confidence_or_margin_go_on_and_rows_in_error_never_do():
    t = labelled([0.9, 0.5, 0.55, None, 0.3],
                 [[0.9, 0.1], [0.5, 0.5], [0.55, 0.45], None, [0.3, 0.7]],
                 error=[None, None, None, None, "empty text"], label=["a", "a", "a", "b", None])
    assert escalated(t, 0.6, None).tolist() == [False, True, True, False, False]
    # Margins: 0.8, 0.0, 0.1; a row without probabilities has no margin to judge.
    assert escalated(t, None, 0.15).tolist() == [False, True, True, False, False]
    assert escalated(t, None, 0.05).tolist() == [False, True, False, False, False]


def test_a_later_stages_rows_replace_exactly_theirs():
    table = pa.table({"id": ["r0", "r1", "r2", "r3"], "label": ["a", "a", "b", "b"],
                      "confidence": pa.array([0.9, 0.4, 0.8, 0.3], pa.float32())})
    later = pa.table({"label": ["c", "a"], "confidence": pa.array([0.99, 0.7], pa.float64()),
                      "reasoning": ["because", None]})
    out = merge_rows(table, np.array([1, 3]), later, ["label", "confidence", "reasoning"])
    assert out.column("id").to_pylist() == ["r0", "r1", "r2", "r3"]
    assert out.column("label").to_pylist() == ["a", "c", "b", "a"]
    assert out.column("confidence").type == pa.float32()
    assert out.column("confidence").to_pylist() == pytest.approx([0.9, 0.99, 0.8, 0.7])
    assert out.column("reasoning").to_pylist() == [None, "because", None, None]


def test_stage_counts_add_up_and_summarise():
    chunk = pa.table({ran_column(0): [True, True, True, False], busy_column(0): [0.5, 0.5, 0.5, 0.0],
                      ran_column(1): [False, True, True, False], busy_column(1): [0.0, 1.0, 1.0, 0.0],
                      FIRST_LABEL: ["a", "b", "a", None]})
    written = pa.table({LABELLED_BY: ["s", "l", "l", None], "label": ["a", "a", "a", None]})
    counts = stage_counts(chunk, written, ["s", "l"], ["a", "a", "b", "a"], {"a", "b"})
    assert counts == {"s": {"ran": 3, "labelled": 1, "busy_s": 1.5, "scored": 1, "correct": 1},
                      "l": {"ran": 2, "labelled": 2, "busy_s": 2.0, "scored": 2, "correct": 1},
                      "first_alone": {"scored": 3, "correct": 1}}
    total = add_counts(add_counts({}, counts), counts)
    assert total["l"] == {"ran": 4, "labelled": 4, "busy_s": 4.0, "scored": 4, "correct": 2}
    cfg = validate({"input": {"path": "x", "label_column": "y"}, "output": {"path": "o"},
                    "backend": {"kind": "cascade", "stages": [
                        {"name": "s", "backend": {"model": "m1"}, "escalate_below": 0.7},
                        {"name": "l", "backend": {"model": "m2"}}]}}, model=ClassifyConfig)
    summary = cascade_summary(cfg, total, [1.5, None])
    assert [s["rows_per_busy_s"] for s in summary["stages"]] == [2.0, 1.0]
    assert [s["accuracy_on_its_rows"] for s in summary["stages"]] == [1.0, 0.5]
    assert summary["first_stage_alone_accuracy"] == pytest.approx(1 / 3)
    assert (summary["escalated_rows"], summary["escalated_share"]) == (4, pytest.approx(4 / 6))
    assert summary["stages"][0]["temperature"] == 1.5 and summary["stages"][1]["model"] == "m2"
    assert [(s["actors"], s["cpus_per_actor"]) for s in summary["stages"]] == [(1, 1.0), (1, 1.0)]


def test_every_run_is_a_list_of_stages_and_back_ends_are_asked_by_capability():
    from clsjob.backends.hf import HFClassifier
    from clsjob.contract import result_columns
    from clsjob.run.cascade import CascadeStage, stage_actors

    base = {"input": {"path": "x", "label_column": "y"}, "output": {"path": "o"},
            "labels": ["a", "b"]}
    one = validate({**base, "backend": {"model": "m1"}}, model=ClassifyConfig)
    (stage,) = one.stages()
    assert (stage.name, stage.key, stage.backend.model, stage.escalate_below) == ("hf", "", "m1", None)
    # One stage is its back end's own actor, labelling every row: no stage bookkeeping.
    assert [a for _, a, _ in stage_actors(one, None)] == [HFClassifier]
    assert cascade_summary(one, {}, [1.0]) is None and LABELLED_BY not in result_columns(one)
    prompted = {"kind": "vllm_prompt", "model": "llm", "prompt": {"mode": "json"}}
    two = validate({**base, "backend": {"kind": "cascade", "stages": [
        {"backend": {"model": "m1"}, "escalate_below": 0.7}, {"backend": prompted}]}},
        model=ClassifyConfig)
    assert [(s.name, s.key) for s in two.stages()] == [("1-hf", "backend.stages[0]."),
                                                       ("2-vllm_prompt", "backend.stages[1].")]
    assert [issubclass(a, CascadeStage) for _, a, _ in stage_actors(two, None)] == [True, True]
    assert {"labelled_by", "reasoning"} <= set(result_columns(two))
    hf, llm = (s.backend for s in two.stages())
    assert (hf.serves_classifier, hf.gives_confidence, hf.writes_reasoning, hf.needs_labels) == (
        True, True, False, False)
    assert (llm.serves_classifier, llm.gives_confidence, llm.writes_reasoning, llm.needs_labels) == (
        False, False, True, True)


@pytest.mark.parametrize("stages,extra,message", [
    ([{"backend": {"model": "a"}}, {"backend": {"model": "b"}}], {},
     r"backend.stages\[0\]: set one of escalate_below"),
    ([{"backend": {"model": "a"}, "escalate_below": 0.5},
      {"backend": {"model": "b"}, "escalate_margin_below": 0.1}], {},
     r"backend.stages\[1\].escalate_margin_below: the last stage"),
    ([{"backend": {"kind": "vllm_prompt", "model": "a", "prompt": {"mode": "json"}}, "escalate_below": 0.5},
      {"backend": {"model": "b"}}], {"labels": ["x", "y"]}, r"stages\[0\].backend.prompt.mode json gives no confidence"),
    ([{"name": "one", "backend": {"model": "a"}, "escalate_below": 0.5},
      {"name": "one", "backend": {"model": "b"}}], {}, "names must differ"),
    ([{"backend": {"model": "a"}, "escalate_below": 0.5}, {"backend": {"model": "b"}}],
     {"resources": {"actors": 2}}, "a cascade's actor pools are per stage"),
    ([{"backend": {"model": "a"}, "escalate_below": 0.5},
      {"backend": {"model": "b"}, "resources": {"gpus_per_actor": 2}}], {},
     r"backend.stages\[1\]: resources.gpus_per_actor 2"),
    ([{"backend": {"model": "a"}, "escalate_below": 0.5}], {}, "at least 2 items"),
])
def test_the_config_refuses_a_cascade_that_cannot_run(stages, extra, message):
    with pytest.raises(Exception, match=message):
        validate({"input": {"path": "x"}, "output": {"path": "o"},
                  "backend": {"kind": "cascade", "stages": stages}, **extra}, model=ClassifyConfig)


def test_the_distill_threshold_is_the_lowest_whose_cascade_reaches_the_agreement():
    from clsjob.distill import cascade_threshold, sample_indices

    rng = np.random.default_rng(0)
    confidence = rng.random(200).round(2)  # ties on purpose
    agree = rng.random(200) < confidence  # the sure rows agree more often
    for target in (0.6, 0.8, 0.95, 1.0):
        below, share, agreement = cascade_threshold(confidence, agree, target)
        # Brute force over every candidate threshold: the lowest that reaches the target.
        def cascade(t):
            return ((confidence < t) | agree).mean()
        candidates = sorted(set(confidence.tolist()) | {1.01})
        best = next(t for t in candidates if cascade(t) >= target - 1e-12)
        assert cascade(below) >= target - 1e-12
        assert below == best or (best == 1.01 and below > confidence.max())  # all escalated
        assert agreement == pytest.approx(cascade(below)) and share == pytest.approx((confidence < below).mean())
    assert sample_indices(1000, 10, seed=4).tolist() == sample_indices(1000, 10, seed=4).tolist()
    assert len(set(sample_indices(1000, 10, seed=4).tolist())) == 10 and len(sample_indices(5, 10, 0)) == 5
