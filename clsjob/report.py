"""Evaluation outputs: _metrics.json and a readable report.md, from a Tally of the run."""
from __future__ import annotations

from clsjob import store
from clsjob.config import StorageConfig
from clsjob.contract import MANIFEST, METRICS, REPORT
from clsjob.labels import LabelSet
from clsjob.metrics import Tally, count_rows, summarize
from clsjob.store import InputError


def write_evaluation(output: str, storage: StorageConfig, labels: LabelSet, counts: Tally,
                     rows_per_s: float | None) -> dict:
    metrics = {**summarize(labels, counts), "rows_per_s": rows_per_s}
    store.write_json(metrics, store.join(output, METRICS), storage)
    store.write_text(render_report(metrics), store.join(output, REPORT), storage)
    return metrics


def evaluate_output(output: str, storage: StorageConfig) -> dict:
    """Recompute the metrics of an existing output, one part at a time. Only the parts the
    manifest lists are read, so stray files in the folder cannot skew the numbers."""
    manifest = store.read_json(store.join(output, MANIFEST), storage)
    gold_column = manifest.get("gold_column")
    if not gold_column:
        raise InputError(f"{output}: the run had no input.label_column, nothing to evaluate")
    labels = LabelSet(tuple(manifest["labels"]))
    counts = Tally(n_labels=len(labels))
    for part in manifest["parts"]:
        t = store.read_table(store.join(output, part["part"]), storage,
                             [gold_column, "label", "confidence", "error"])
        counts.add(count_rows(labels, t.column(gold_column).to_pylist(), t.column("label").to_pylist(),
                         t.column("confidence").to_pylist(), t.column("error").to_pylist()))
    return write_evaluation(output, storage, labels, counts, manifest.get("rows_per_s"))


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render_report(m: dict) -> str:
    ece = m["expected_calibration_error"]
    lines = [
        "# Classification report", "",
        f"- rows: {m['rows']} (scored {m['rows_scored']}, errored {m['rows_errored']}, "
        f"no gold label {m['gold_missing']}, gold label outside the label set "
        f"{m['gold_outside_labels']})",
        f"- accuracy: **{m['accuracy']:.4f}**",
        f"- F1 weighted {m['f1_weighted']:.4f} · macro {m['f1_macro']:.4f}",
        f"- precision weighted {m['precision_weighted']:.4f} · macro {m['precision_macro']:.4f}",
        f"- recall weighted {m['recall_weighted']:.4f} · macro {m['recall_macro']:.4f}",
        f"- expected calibration error: {'n/a' if ece is None else f'{ece:.4f}'}",
        f"- rows/s: {m.get('rows_per_s') or 'n/a'}", "",
        "## Per class", "",
    ]
    lines += _table(["label", "precision", "recall", "F1", "support"],
                    [[name, f"{s['precision']:.3f}", f"{s['recall']:.3f}", f"{s['f1']:.3f}",
                      s["support"]] for name, s in m["per_class"].items()])
    lines += ["", "## Confusion matrix (rows: gold, columns: predicted)", ""]
    lines += _table(["gold \\ predicted", *m["labels"]],
                    [[name, *row] for name, row in zip(m["labels"], m["confusion_matrix"])])
    if m["gold_outside_labels_values"]:
        lines += ["", "## Gold labels outside the label set", ""]
        lines += _table(["gold label", "rows"], [[k, v] for k, v in m["gold_outside_labels_values"].items()])
    return "\n".join(lines) + "\n"
