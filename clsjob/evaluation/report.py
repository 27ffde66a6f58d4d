"""Evaluation outputs: _metrics.json, a readable report.md and report.html, from a Tally of
the run; and `clsjob calibrate`'s temperature, fitted on a labelled run's probabilities."""
from __future__ import annotations

import numpy as np

from clsjob import store
from clsjob.config import CASCADE, AbstainConfig, StorageConfig
from clsjob.contract import CALIBRATION, MANIFEST, METRICS, REPORT, REPORT_HTML
from clsjob.evaluation.abstain import scored_labels
from clsjob.evaluation.calibration import calibrate
from clsjob.evaluation.report_html import render_html
from clsjob.evaluation.tally import Tally
from clsjob.labels import LabelSet
from clsjob.store import InputError
from clsjob.task import Task


def write_evaluation(output: str, storage: StorageConfig, labels: LabelSet, counts: Tally, task: Task,
                     rows_per_s: float | None, target_accuracy: float | None = None,
                     drift: dict | None = None, cascade: dict | None = None) -> dict:
    metrics = {**task.summarize(labels, counts, target_accuracy), "rows_per_s": rows_per_s}
    if drift is not None:  # monitor.baseline: as in the manifest
        metrics["drift"] = drift
    if cascade is not None:  # per stage, as in the manifest
        metrics[CASCADE] = cascade
    store.write_json(metrics, store.join(output, METRICS), storage)
    markdown = task.report(metrics)
    store.write_text(markdown, store.join(output, REPORT), storage)
    store.write_text(render_html(metrics, counts, markdown, task), store.join(output, REPORT_HTML), storage)
    return metrics


def evaluate_output(output: str, storage: StorageConfig, target_accuracy: float | None = None) -> dict:
    """Recompute the metrics of an existing output, one part at a time. Only the parts the
    manifest lists are read, so stray files in the folder cannot skew the numbers."""
    manifest = store.read_json(store.join(output, MANIFEST), storage)
    gold_column = manifest.get("gold_column")
    if not gold_column:
        raise InputError(f"{output}: the run had no input.label_column, nothing to evaluate")
    rule = manifest.get("abstain")
    labels = scored_labels(LabelSet(tuple(manifest["labels"])), AbstainConfig(**rule) if rule else None)
    task = Task.of(manifest.get("task", "single_label"))
    counts = task.tally(len(labels))
    for part in manifest["parts"]:
        t = store.read_table(store.join(output, part["part"]), storage,
                             [gold_column, *task.answer_columns, "confidence", "error"])
        counts.add(task.count(labels, t, gold_column, manifest.get("temperature")))
    return write_evaluation(output, storage, labels, counts, task, manifest.get("rows_per_s"),
                            target_accuracy, manifest.get("drift"), manifest.get(CASCADE))


def calibrate_output(output: str, storage: StorageConfig) -> dict:
    """Fit the temperature on a labelled run's probabilities (the rows with a gold label in
    the label set and probabilities) and write it to the run's _calibration.json.

    The log-probabilities stand in for the logits (they differ by a per-row constant, which
    the softmax removes). The run's own probabilities were already divided by the manifest's
    temperature T0, so the fit finds T' on top of it, and the temperature to configure is
    T0 x T'. The rows' probabilities are held in memory: rows x labels x 8 bytes."""
    manifest = store.read_json(store.join(output, MANIFEST), storage)
    gold_column, applied = manifest.get("gold_column"), manifest.get("temperature")
    if not gold_column:
        raise InputError(f"{output}: the run had no input.label_column, nothing to calibrate on")
    Task.of(manifest.get("task", "single_label")).check_calibration(output)
    if applied is None:
        raise InputError(f"{output}: the run's back end gives no probabilities "
                         f"({manifest.get('backend')}); calibration needs them "
                         f"(vllm_prompt: prompt.mode score)")
    labels = LabelSet(tuple(manifest["labels"]))
    logp, gold = [], []
    for part in manifest["parts"]:
        t = store.read_table(store.join(output, part["part"]), storage, [gold_column, "probs"])
        has_probs, golds = t.column("probs").is_valid().to_pylist(), t.column(gold_column).to_pylist()
        rows = [i for i, g in enumerate(golds) if g in labels and has_probs[i]]
        gold += [labels.id_of(golds[i]) for i in rows]
        probs = np.asarray(t.column("probs").take(rows).combine_chunks().flatten(), dtype=np.float64)
        # Floored at float32's smallest: a probability that underflowed to 0 stays finite.
        logp.append(np.log(np.maximum(probs, 1e-45)).reshape(len(rows), len(labels)))
    if not gold:
        raise InputError(f"{output}: no row has both probabilities and a gold label in the label set")
    fitted = calibrate(np.concatenate(logp), np.array(gold))
    result = {**fitted, "applied_temperature": applied, "relative_temperature": fitted["temperature"],
              "temperature": round(applied * fitted["temperature"], 6), "backend": manifest["backend"]}
    store.write_json(result, store.join(output, CALIBRATION), storage)
    return result


def render_report(m: dict) -> str:
    """report.md of a run's metrics: its task's sections (report_markdown.py)."""
    return Task.of_metrics(m).report(m)
