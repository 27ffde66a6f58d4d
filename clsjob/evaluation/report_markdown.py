"""report.md: a run's metrics as text, a report per task (task.py picks it) from the
sections every run shares (drift, a cascade's stages, accuracy against coverage)."""
from __future__ import annotations

from clsjob.config import CASCADE

def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def single_label_report(m: dict) -> str:
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
    lines += cascade_lines(m.get(CASCADE), m["accuracy"])
    if m["gold_outside_labels_values"]:
        lines += ["", "## Gold labels outside the label set", ""]
        lines += _table(["gold label", "rows"], [[k, v] for k, v in m["gold_outside_labels_values"].items()])
    return "\n".join(lines) + "\n"


def multilabel_report(m: dict) -> str:
    """A multi-label run: the averages, each label's scores, and the pairs most often mixed
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
