"""Evaluation outputs: _metrics.json, a readable report.md and report.html, from a Tally of
the run; and `clsjob calibrate`'s temperature, fitted on a labelled run's probabilities."""
from __future__ import annotations

import numpy as np

from clsjob import store
from clsjob.abstain import scored_labels
from clsjob.calibration import calibrate
from clsjob.config import AbstainConfig, StorageConfig
from clsjob.contract import CALIBRATION, MANIFEST, METRICS, REPORT, REPORT_HTML
from clsjob.labels import LabelSet
from clsjob.metrics import count_part, summarize
from clsjob.tally import Tally
from clsjob.report_html import render_html
from clsjob.store import InputError


def write_evaluation(output: str, storage: StorageConfig, labels: LabelSet, counts: Tally,
                     rows_per_s: float | None, target_accuracy: float | None = None,
                     drift: dict | None = None, cascade: dict | None = None) -> dict:
    metrics = {**summarize(labels, counts, target_accuracy), "rows_per_s": rows_per_s}
    if drift is not None:  # monitor.baseline: as in the manifest
        metrics["drift"] = drift
    if cascade is not None:  # per stage, as in the manifest
        metrics["cascade"] = cascade
    store.write_json(metrics, store.join(output, METRICS), storage)
    markdown = render_report(metrics)
    store.write_text(markdown, store.join(output, REPORT), storage)
    store.write_text(render_html(metrics, counts, markdown), store.join(output, REPORT_HTML), storage)
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
    task = manifest.get("task", "single_label")
    counts = Tally.for_task(len(labels), task)
    answer = ["labels"] if task == "multi_label" else ["label", "probs"]
    for part in manifest["parts"]:
        t = store.read_table(store.join(output, part["part"]), storage,
                             [gold_column, *answer, "confidence", "error"])
        counts.add(count_part(labels, t, gold_column, manifest.get("temperature")))
    return write_evaluation(output, storage, labels, counts, manifest.get("rows_per_s"), target_accuracy,
                            manifest.get("drift"), manifest.get("cascade"))


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
    if manifest.get("task") == "multi_label":
        raise InputError(f"{output}: a task: multi_label run has a threshold per label, not a "
                         f"temperature; `clsjob finetune` tunes the thresholds on its eval rows")
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


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render_report(m: dict) -> str:
    if m.get("task") == "multi_label":
        return render_multilabel_report(m)
    ece, nll = m["expected_calibration_error"], m.get("negative_log_likelihood")
    raw = m.get("uncalibrated")
    raw_nll = raw and raw["negative_log_likelihood"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    lines = [
        "# Classification report", "",
        f"- rows: {m['rows']} (scored {m['rows_scored']}, errored {m['rows_errored']}, "
        f"no gold label {m['gold_missing']}, gold label outside the label set "
        f"{m['gold_outside_labels']})",
    ]
    if not m["rows_scored"]:
        lines += ["- accuracy, F1, precision, recall: none — no row had both a label and a gold "
                  "label in the label set, so there is nothing to score"]
    else:
        lines += [
            f"- accuracy: **{m['accuracy']:.4f}**",
            f"- F1 weighted {m['f1_weighted']:.4f} · macro {m['f1_macro']:.4f}",
            f"- precision weighted {m['precision_weighted']:.4f} · macro {m['precision_macro']:.4f}",
            f"- recall weighted {m['recall_weighted']:.4f} · macro {m['recall_macro']:.4f}",
        ]
    lines += [
        f"- expected calibration error: {'n/a' if ece is None else f'{ece:.4f}'} · "
        f"negative log-likelihood: {'n/a' if nll is None else f'{nll:.4f}'}"
        + (f" (before calibration: {raw['expected_calibration_error']:.4f} · {fmt(raw_nll)})"
           if raw else ""),
        f"- rows/s: {m.get('rows_per_s') or 'n/a'}", "",
        "## Per class", "",
    ]
    lines += _table(["label", "precision", "recall", "F1", "support"],
                    [[name, f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}",
                      s["support"]] for name, s in m["per_class"].items()])
    lines += ["", "## Confusion matrix (rows: gold, columns: predicted)", ""]
    lines += _table(["gold \\ predicted", *m["labels"]],
                    [[name, *row] for name, row in zip(m["labels"], m["confusion_matrix"])])
    lines += coverage_lines(m.get("coverage"))
    lines += drift_lines(m.get("drift"))
    lines += cascade_lines(m.get("cascade"), m["accuracy"])
    if m["gold_outside_labels_values"]:
        lines += ["", "## Gold labels outside the label set", ""]
        lines += _table(["gold label", "rows"], [[k, v] for k, v in m["gold_outside_labels_values"].items()])
    return "\n".join(lines) + "\n"


def render_multilabel_report(m: dict) -> str:
    """task: multi_label: the averages, each label's scores, and the pairs most often mixed
    up (a gold label missed on rows where another, not gold, was given)."""
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    card = m["label_cardinality"]
    lines = [
        "# Classification report (multi-label)", "",
        f"- rows: {m['rows']} (scored {m['rows_scored']}, errored {m['rows_errored']}, "
        f"no gold labels {m['gold_missing']}, gold label outside the label set "
        f"{m['gold_outside_labels']})",
    ]
    if not m["rows_scored"]:
        lines += ["- F1, precision, recall: none — no row had both labels and gold labels in "
                  "the label set, so there is nothing to score"]
    else:
        lines += [
            f"- F1 micro **{fmt(m['f1_micro'])}** · macro **{fmt(m['f1_macro'])}** · weighted "
            f"{fmt(m['f1_weighted'])}",
            f"- precision micro {fmt(m['precision_micro'])} · macro {fmt(m['precision_macro'])} · "
            f"weighted {fmt(m['precision_weighted'])}",
            f"- recall micro {fmt(m['recall_micro'])} · macro {fmt(m['recall_macro'])} · "
            f"weighted {fmt(m['recall_weighted'])}",
            f"- subset accuracy (the whole set right) {fmt(m['subset_accuracy'])} · Hamming loss "
            f"{fmt(m['hamming_loss'])}",
            f"- labels a row: gold {fmt(card['gold'])} · predicted {fmt(card['predicted'])}",
        ]
    lines += [f"- rows/s: {m.get('rows_per_s') or 'n/a'}", "", "## Per label", ""]
    lines += _table(["label", "precision", "recall", "F1", "support"],
                    [[name, f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}",
                      s["support"]] for name, s in m["per_label"].items()])
    if m["most_confused"]:
        lines += ["", "## Most confused pairs", "",
                  "Rows where the gold label was missed while the other label, not gold, was given:", ""]
        lines += _table(["gold label missed", "label given instead", "rows"],
                        [[c["gold"], c["predicted"], c["rows"]] for c in m["most_confused"]])
    lines += drift_lines(m.get("drift"))
    if m["gold_outside_labels_values"]:
        lines += ["", "## Gold labels outside the label set", ""]
        lines += _table(["gold label", "rows"], [[k, v] for k, v in m["gold_outside_labels_values"].items()])
    return "\n".join(lines) + "\n"


def drift_lines(drift: dict | None) -> list[str]:
    """Drift against monitor.baseline: the label shares of both runs and the measures."""
    if not drift:
        return []
    lines = ["", "## Drift against the baseline", "", f"Baseline: {drift['baseline']}", ""]
    if not drift["compared"]:
        return lines + [f"Not compared: {drift['why']}."]
    conf, under = drift["mean_confidence"], drift["share_under"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    lines += [f"- population stability index {drift['psi']:.4f} · Jensen–Shannon divergence "
              f"{drift['js']:.4f}",
              f"- mean confidence {fmt(conf['now'])} (baseline {fmt(conf['baseline'])})",
              f"- rows under confidence {under['below']}: {fmt(under['now'])} "
              f"(baseline {fmt(under['baseline'])})",
              f"- alerts: {', '.join(drift['alerts']) or 'none'}", ""]
    lines += _table(["label", "share now", "share in the baseline"],
                    [[name, f"{100 * s['now']:.1f}%", f"{100 * s['baseline']:.1f}%"]
                     for name, s in drift["label_shares"].items()])
    return lines


def cascade_lines(cascade: dict | None, accuracy: float | None) -> list[str]:
    """A cascade's stages: rows each ran on and labelled, its speed, its accuracy."""
    if not cascade:
        return []
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    share = cascade["escalated_share"]
    lines = ["", "## Cascade", "",
             f"Accuracy of the cascade {fmt(accuracy)}; of the first stage alone, on every row "
             f"{fmt(cascade.get('first_stage_alone_accuracy'))}. Rows escalated: "
             f"{cascade['escalated_rows']} ({'n/a' if share is None else f'{100 * share:.1f}%'}).", ""]
    lines += _table(["stage", "model", "escalates", "rows ran", "rows labelled", "rows/s busy",
                     "accuracy on its rows"],
                    [[s["name"], s["model"], (f"confidence < {s['escalate_below']}" if s["escalate_below"]
                                              else f"margin < {s['escalate_margin_below']}"
                                              if s["escalate_margin_below"] else "—"),
                      s["rows_ran"], s["rows_labelled"], s["rows_per_busy_s"] or "n/a",
                      fmt(s.get("accuracy_on_its_rows"))] for s in cascade["stages"]])
    return lines


def coverage_lines(coverage: dict | None) -> list[str]:
    """Accuracy against coverage: what a review threshold keeps, and at what accuracy."""
    if not coverage:
        return []
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = ["", "## Accuracy against coverage", "",
             f"Keeping only the rows whose confidence is at or above a threshold "
             f"(of {coverage['rows_scored']} scored rows):", ""]
    lines += _table(["confidence ≥", "rows kept", "share kept", "accuracy of kept rows"],
                    [[t["threshold"], t["rows"], pct(t["coverage"]), pct(t["accuracy"])]
                     for t in coverage["thresholds"]])
    if "target_accuracy" in coverage:
        target, reached = coverage["target_accuracy"], coverage["target"]
        lines += ["", f"Target accuracy {pct(target)}: " + (
            f"reached at confidence ≥ {reached['threshold']:.3f}, keeping {pct(reached['coverage'])} "
            f"of the rows ({reached['rows']}) at {pct(reached['accuracy'])}" if reached
            else "no threshold reaches it")]
    return lines
