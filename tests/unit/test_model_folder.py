"""The model folder's contract (clsjob/model_folder.py): what merge writes into config.json and
how it reads back; and clsjob's modules import one another without a cycle."""
import ast
from pathlib import Path

import pytest

from clsjob import model_folder
from clsjob.labels import LabelSet
from clsjob.task import MULTI_LABEL, SINGLE_LABEL, Task

PACKAGE = Path(model_folder.__file__).parent


def test_merge_writes_what_the_fine_tune_fitted_and_the_task_head():
    single = {"calibration": {"temperature": 1.7, "abstain": {"below": 0.42}}}
    assert model_folder.written_keys(SINGLE_LABEL, single) == {
        "clsjob_temperature": 1.7, "clsjob_abstain_below": 0.42}
    multi = {"thresholds": {"joy": 0.3}, "calibration": None}
    assert model_folder.written_keys(MULTI_LABEL, multi) == {
        "problem_type": "multi_label_classification", "clsjob_thresholds": {"joy": 0.3}}
    # No eval rows: nothing fitted, nothing written; the folder reads back at T = 1.
    assert model_folder.written_keys(SINGLE_LABEL, {}) == {}
    assert model_folder.temperature({}, "m") == 1.0


def test_what_merge_writes_reads_back():
    keys = model_folder.written_keys(MULTI_LABEL, {
        "thresholds": {"joy": 0.3, "anger": 0.6},
        "calibration": {"temperature": 0.8, "abstain": {"below": 0.5}}})
    assert Task.trained(keys) == MULTI_LABEL and Task.trained(keys).name == "multi_label"
    assert Task.trained({}) == SINGLE_LABEL
    assert model_folder.temperature(keys, "m") == 0.8
    assert model_folder.abstain_below(keys) == 0.5
    assert model_folder.thresholds(keys, LabelSet(("anger", "joy", "love")), "m").tolist() == [
        0.6, 0.3, 0.5]


@pytest.mark.parametrize("below", [None, 0, 1.5, "0.5", True])
def test_an_unusable_abstain_threshold_reads_as_none(below):
    assert model_folder.abstain_below({"clsjob_abstain_below": below}) is None


def test_the_distance_index_settings_round_trip_and_bad_ones_name_the_folder():
    summary = {"distance": {"k": 10, "above": 0.31, "rows": 500, "per_class": 250, "seconds": 3.0}}
    keys = model_folder.written_keys(SINGLE_LABEL, summary)
    assert keys == {"clsjob_distance": {"k": 10, "above": 0.31, "rows": 500}}
    assert model_folder.distance_settings(keys, "m") == (10, 0.31)
    # No eval rows: an index without a threshold.
    assert model_folder.distance_settings({"clsjob_distance": {"k": 3, "above": None}}, "m") == (3, None)
    with pytest.raises(ValueError, match="folder-x: config.json has no clsjob_distance"):
        model_folder.distance_settings({}, "folder-x")
    for bad in ({"k": 0, "above": 0.3}, {"k": 2.5, "above": 0.3}, {"k": 5, "above": 3}):
        with pytest.raises(ValueError, match="positive integer k"):
            model_folder.distance_settings({"clsjob_distance": bad}, "m")


def module_imports(path: Path) -> set[str]:
    """The clsjob modules `path` imports, at the top or inside a function: a cycle broken by
    a function-level import is still two modules that cannot be read one without the other."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clsjob"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("clsjob")}
    return found


def test_no_import_cycle():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {name: {m for m in module_imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    done, trail = set(), []

    def visit(name: str) -> None:
        if name in trail:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(name):] + [name]))
        if name in done:
            return
        trail.append(name)
        for other in sorted(graph[name]):
            visit(other)
        trail.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    # The cycle there was (calibration imported metrics, metrics calibration in a function).
    assert "clsjob.evaluation.calibration" in graph["clsjob.evaluation.metrics"]
    assert "clsjob.evaluation.metrics" not in graph["clsjob.evaluation.calibration"]


def test_the_mahalanobis_threshold_travels_beside_knns_and_an_older_folder_is_named():
    summary = {"distance": {"k": 10, "above": 0.31, "mahalanobis_above": 14.2, "rows": 500}}
    keys = model_folder.written_keys(SINGLE_LABEL, summary)
    assert keys["clsjob_distance"] == {"k": 10, "above": 0.31, "rows": 500, "mahalanobis_above": 14.2}
    assert model_folder.distance_settings(keys, "m", "mahalanobis") == (10, 14.2)
    assert model_folder.distance_settings(keys, "m", "knn") == (10, 0.31)
    older = {"clsjob_distance": {"k": 10, "above": 0.31, "rows": 500}}
    with pytest.raises(ValueError, match="m: config.json's clsjob_distance has no mahalanobis_above"):
        model_folder.distance_settings(older, "m", "mahalanobis")
    with pytest.raises(ValueError, match="a mahalanobis_above between 0 and inf"):
        model_folder.distance_settings({"clsjob_distance": {"k": 3, "mahalanobis_above": -1}}, "m",
                                       "mahalanobis")
