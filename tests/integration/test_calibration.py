"""Calibrated confidence end to end: a model folder's temperature applied by `hf` through Ray
Data and recorded in the manifest, and `clsjob calibrate` fitting one on a labelled run."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from clsjob.backends import ModelError
from clsjob.backends.hf import load_classifier, predict_probs
from clsjob.cli import main
from clsjob.config import ClassifyConfig, HFBackendConfig, StorageConfig, validate
from clsjob.evaluation.report import calibrate_output
from clsjob.labels import LabelSet
from clsjob.model_folder import rescale_probs
from clsjob.run.pipeline import run_classify
from clsjob.store import InputError, read_table, list_parts
from helpers import LABELS, sample_texts, write_shards


def with_temperature(model, folder, temperature):
    """A copy of the model folder whose config.json carries a fitted temperature."""
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "clsjob_temperature": temperature}))
    return folder


def classify(model, inp, out, label_column="label", **backend):
    return run_classify(validate({
        "input": {"path": str(inp), "label_column": label_column},
        "backend": {"model": str(model), "max_length": 64, "dtype": "float32", **backend},
        "resources": {"actors": 1}, "output": {"path": str(out), "rows_per_part": 50}},
        model=ClassifyConfig))


def rows_by_id(out) -> dict:
    table = pa.concat_tables(read_table(p, StorageConfig()) for p in list_parts(str(out), StorageConfig()))
    return {r["id"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def labelled(qwen_model, tmp_path_factory):
    """Texts whose gold label is the tiny model's own answer for 4 rows in 5 and another
    label for the fifth: a model with something to calibrate (on labels unrelated to its
    answers the best temperature is the largest, a uniform guess)."""
    inp = tmp_path_factory.mktemp("cal") / "in"
    model, tokenizer = load_classifier(HFBackendConfig(model=str(qwen_model)), "cpu")
    names = LabelSet.from_id2label(model.config.id2label).names
    shards = []
    for s in range(2):
        texts = sample_texts(120, seed=s)
        answers = predict_probs(model, tokenizer, texts, 64, 16, "cpu").argmax(axis=1)
        shards.append({"text": texts, "label": [names[(k + (i % 5 == 0)) % len(names)]
                                                 for i, k in enumerate(answers)]})
    write_shards(inp, shards)
    return inp


def test_the_model_folders_temperature_scales_every_probability(qwen_model, labelled, ray_cluster, tmp_path):
    hot = with_temperature(qwen_model, tmp_path / "hot", 2.5)
    raw = classify(hot, labelled, tmp_path / "raw", calibrated=False)
    cal = classify(hot, labelled, tmp_path / "cal")
    assert json.loads((tmp_path / "raw" / "_manifest.json").read_text())["temperature"] == 1.0
    assert json.loads((tmp_path / "cal" / "_manifest.json").read_text())["temperature"] == 2.5
    a, b = rows_by_id(tmp_path / "raw"), rows_by_id(tmp_path / "cal")
    assert a.keys() == b.keys() and len(a) == 240
    want = rescale_probs(np.array([a[i]["probs"] for i in a]), 2.5)
    np.testing.assert_allclose([b[i]["probs"] for i in a], want, atol=1e-5)
    assert [b[i]["label"] for i in a] == [a[i]["label"] for i in a]  # T never changes the label
    assert max(b[i]["confidence"] for i in a) < max(a[i]["confidence"] for i in a)
    assert cal.metrics["accuracy"] == raw.metrics["accuracy"]
    assert cal.metrics["negative_log_likelihood"] != pytest.approx(raw.metrics["negative_log_likelihood"])
    # The calibrated run also counts its rows as they were before T: the raw run's numbers.
    before = cal.metrics["uncalibrated"]
    assert raw.metrics["uncalibrated"] is None
    assert before["expected_calibration_error"] == pytest.approx(raw.metrics["expected_calibration_error"], abs=1e-5)
    assert before["negative_log_likelihood"] == pytest.approx(raw.metrics["negative_log_likelihood"], abs=1e-5)
    assert before["calibration"]["rows"] == raw.metrics["calibration"]["rows"]
    report = (tmp_path / "cal" / "report.md").read_text()
    assert f"(before calibration: {raw.metrics['expected_calibration_error']:.4f}" in report


def test_calibrate_fits_the_same_temperature_whatever_the_run_applied(qwen_model, labelled, ray_cluster,
                                                                      tmp_path, capsys):
    """Fitted on a raw run or on one already scaled by 2.5, the temperature to configure is
    the same: the fit on the scaled run finds the rest of the way (relative_temperature)."""
    hot = with_temperature(qwen_model, tmp_path / "hot", 2.5)
    classify(hot, labelled, tmp_path / "raw", calibrated=False)
    classify(hot, labelled, tmp_path / "cal")
    from_raw = calibrate_output(str(tmp_path / "raw"), StorageConfig())
    assert main(["calibrate", "--output", str(tmp_path / "cal")]) == 0
    from_cal = json.loads(capsys.readouterr().out)
    assert from_cal == json.loads((tmp_path / "cal" / "_calibration.json").read_text())
    assert from_raw["rows"] == from_cal["rows"] == 240
    assert from_cal["applied_temperature"] == 2.5 and from_raw["applied_temperature"] == 1.0
    assert from_cal["temperature"] == pytest.approx(from_raw["temperature"], rel=1e-3)
    assert from_cal["relative_temperature"] == pytest.approx(from_raw["temperature"] / 2.5, rel=1e-3)
    assert not from_raw["at_bound"] and not from_cal["at_bound"]
    assert from_raw["nll_after"] < from_raw["nll_before"] and from_raw["ece_after"] < from_raw["ece_before"]
    assert from_raw["accuracy"] == pytest.approx(0.8, abs=0.01)  # the gold labels' make-up


def test_calibrate_needs_gold_labels(qwen_model, labelled, ray_cluster, tmp_path, capsys):
    classify(qwen_model, labelled, tmp_path / "out", label_column=None)
    assert main(["calibrate", "--output", str(tmp_path / "out")]) == 2
    assert "no input.label_column, nothing to calibrate on" in capsys.readouterr().err
    with pytest.raises(InputError, match="nothing to calibrate on"):
        calibrate_output(str(tmp_path / "out"), StorageConfig())


def test_a_bad_temperature_fails_before_any_row_is_read(qwen_model, labelled, tmp_path):
    bad = with_temperature(qwen_model, tmp_path / "bad", -1)
    with pytest.raises(ModelError, match=r"bad: config.json's clsjob_temperature must be a positive number, not -1"):
        classify(bad, labelled, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_abstention_relabels_unsure_rows_and_scores_the_fallback(qwen_model, labelled, ray_cluster, tmp_path):
    """abstain.below left out: the threshold the model folder carries. Rows under it get the
    fallback label; gold rows carrying that label are scored as a class of their own."""
    folder = with_temperature(qwen_model, tmp_path / "m", 1.0)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "clsjob_abstain_below": 0.36}))
    oos = tmp_path / "oos"
    write_shards(oos, [{"text": sample_texts(60, seed=7), "label": ["out_of_scope"] * 30 + [LABELS[0]] * 30}])
    plain = classify(folder, oos, tmp_path / "plain")
    summary = run_classify(validate({
        "input": {"path": str(oos), "label_column": "label"},
        "backend": {"model": str(folder), "max_length": 64, "dtype": "float32"},
        "abstain": {"label": "out_of_scope"},
        "output": {"path": str(tmp_path / "abstained"), "rows_per_part": 50}}, model=ClassifyConfig))
    a, b = rows_by_id(tmp_path / "plain"), rows_by_id(tmp_path / "abstained")
    under = {i for i in a if a[i]["confidence"] < 0.36}
    assert 0 < len(under) < 60  # the tiny model's confidences straddle the threshold
    assert all(b[i]["label"] == ("out_of_scope" if i in under else a[i]["label"]) for i in a)
    assert all(b[i]["confidence"] == a[i]["confidence"] and b[i]["error"] is None for i in a)
    manifest = json.loads((tmp_path / "abstained" / "_manifest.json").read_text())
    assert manifest["abstain"] == {"score": "confidence", "label": "out_of_scope", "below": 0.36,
                                   "above": None, "distance": None}
    assert manifest["labels"] == list(LABELS)  # probs stay in the model's label order
    m = summary.metrics
    assert m["labels"] == [*LABELS, "out_of_scope"] and m["rows_scored"] == 60
    assert plain.metrics["rows_scored"] == 30  # without abstention, out_of_scope is outside the set
    gold_oos = [i for i in b if b[i]["gold"] == "out_of_scope"]
    recall = sum(b[i]["label"] == "out_of_scope" for i in gold_oos) / len(gold_oos)
    assert m["per_class"]["out_of_scope"]["recall"] == pytest.approx(recall)
    assert m["negative_log_likelihood"] is None  # the fallback has no probability of its own
    (tmp_path / "abstained" / "_metrics.json").unlink()
    from clsjob.evaluation.report import evaluate_output
    assert evaluate_output(str(tmp_path / "abstained"), StorageConfig())["confusion_matrix"] == m["confusion_matrix"]


def test_abstention_without_a_threshold_anywhere_is_refused(qwen_model, labelled, tmp_path):
    with pytest.raises(Exception, match="carries no usable clsjob_abstain_below"):
        run_classify(validate({
            "input": {"path": str(labelled)}, "backend": {"model": str(qwen_model)},
            "abstain": {"label": "oos"}, "output": {"path": str(tmp_path / "o")}}, model=ClassifyConfig))
