"""report.html: the evaluation as a page a person would rather look at, self-contained (the
plots are PNGs inline as data: URLs, no script, nothing fetched at view time).

Plots with matplotlib's Agg back end (no display needed): the confusion matrix as a heat map
(the most frequent classes, the rest folded into one), the reliability diagram, per-class F1,
the confidence histogram, accuracy against coverage and, with a baseline run, the label
shares of both runs side by side.
"""
from __future__ import annotations

import base64
import html
import io

import numpy as np

from clsjob.evaluation.tally import COVERAGE_BINS, Tally

TOP_CLASSES = 15  # heat map and F1 bars: beyond this many classes the rest are folded
OTHER = "(other)"


def top_classes(m: dict, n: int = TOP_CLASSES) -> list[int]:
    """Indices of the `n` classes with the most gold rows (then most predicted), in label order."""
    per = m["per_class"]
    order = sorted(range(len(m["labels"])), key=lambda i: (-per[m["labels"][i]]["support"],
                                                            -per[m["labels"][i]]["predicted"], i))
    return sorted(order[:n])


def folded_confusion(m: dict, keep: list[int]) -> tuple[list[str], np.ndarray]:
    """The confusion matrix over `keep`, every other class summed into OTHER."""
    matrix = np.array(m["confusion_matrix"], dtype=np.int64)
    rest = [i for i in range(len(m["labels"])) if i not in keep]
    if not rest:
        return [m["labels"][i] for i in keep], matrix[np.ix_(keep, keep)]
    groups = [[i] for i in keep] + [rest]
    folded = np.array([[matrix[np.ix_(g, h)].sum() for h in groups] for g in groups])
    return [m["labels"][i] for i in keep] + [OTHER], folded


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def figures(m: dict, t: Tally, task) -> list[tuple[str, str, str]]:
    """(id, caption, base64 PNG) of each plot of the `task` (task.py) that has data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return task.figures(m, t, plt)


def single_label_figures(m: dict, t: Tally, plt) -> list[tuple[str, str, str]]:
    out = []
    if m["rows_scored"]:
        names, matrix = folded_confusion(m, top_classes(m))
        share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        size = 2.5 + 0.45 * len(names)
        fig, ax = plt.subplots(figsize=(size, size))
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        for (i, j), n in np.ndenumerate(matrix):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
        folded = f" ({len(m['labels']) - len(names) + 1} classes folded into {OTHER})" if OTHER in names else ""
        out.append(("confusion", f"Confusion matrix, rows normalised{folded}", _png(fig)))

        keep = top_classes(m)
        f1 = [m["per_class"][m["labels"][i]]["f1"] for i in keep]
        fig, ax = plt.subplots(figsize=(6, 1 + 0.3 * len(keep)))
        ax.barh([m["labels"][i] for i in keep], f1, color="#4477aa")
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_xlabel("F1")
        out.append(("f1", "F1 per class" + (f" (the {len(keep)} most frequent)"
                                             if len(keep) < len(m["labels"]) else ""), _png(fig)))

    cal, raw = m["calibration"], m.get("uncalibrated")
    if sum(cal["rows"]) and m["expected_calibration_error"] is not None:
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
        caption = f"Reliability diagram (ECE {m['expected_calibration_error']:.4f}"
        if raw:  # before the temperature, beside after it
            reliability_line(ax, raw["calibration"], "#bbbbbb", "before calibration")
            caption += f"; before calibration {raw['expected_calibration_error']:.4f}"
        reliability_line(ax, cal, "#4477aa", "this run" if not raw else "after calibration")
        ax.set_xlabel("mean confidence of the bin")
        ax.set_ylabel("accuracy of the bin's rows")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(loc="upper left", fontsize=8)
        out.append(("reliability", caption + ")", _png(fig)))

    if t.distribution.confidence_counts.sum():
        out.append(confidence_histogram(t, plt, "confidence"))

    rows, correct = t.coverage.rows, t.coverage.correct
    if rows.sum() and not t.rows.no_confidence:
        rows_from, correct_from = np.cumsum(rows[::-1])[::-1], np.cumsum(correct[::-1])[::-1]
        has = rows_from > 0
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(rows_from[has] / rows.sum(), correct_from[has] / rows_from[has], color="#aa3377")
        ax.set_xlabel("share of rows kept (confidence at or above a threshold)")
        ax.set_ylabel("accuracy of the rows kept")
        ax.set_xlim(0, 1.02)
        out.append(("coverage", f"Accuracy against coverage ({COVERAGE_BINS} thresholds)", _png(fig)))

    drift = m.get("drift")
    if drift and drift.get("compared"):
        names = list(drift["label_shares"])
        now = [drift["label_shares"][n]["now"] for n in names]
        before = [drift["label_shares"][n]["baseline"] for n in names]
        x = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(2 + 0.5 * len(names), 4))
        ax.bar(x - 0.2, before, width=0.4, label="baseline", color="#bbbbbb")
        ax.bar(x + 0.2, now, width=0.4, label="this run", color="#4477aa")
        ax.set_xticks(x, names, rotation=60, ha="right")
        ax.set_ylabel("share of rows")
        ax.legend()
        out.append(("drift", f"Label shares against the baseline (PSI {drift['psi']:.4f})", _png(fig)))
    return out


def multilabel_figures(m: dict, t: Tally, plt) -> list[tuple[str, str, str]]:
    """A multi-label run: each label's F1, and the confidence of every labelled row."""
    out = []
    if m["rows_scored"]:
        names = list(m["per_label"])
        f1 = [m["per_label"][n]["f1"] for n in names]
        fig, ax = plt.subplots(figsize=(6, 1 + 0.25 * len(names)))
        ax.barh(names, f1, color="#4477aa")
        ax.invert_yaxis()
        ax.set_xlabel("F1")
        ax.set_xlim(0, 1)
        out.append(("per_label_f1", f"F1 per label (macro {m['f1_macro']:.4f})", _png(fig)))
    if t.distribution.confidence_counts.sum():
        out.append(confidence_histogram(t, plt, "confidence (distance of the closest call from "
                                                "its threshold)"))
    return out


def confidence_histogram(t: Tally, plt, xlabel: str) -> tuple[str, str, str]:
    hist = t.distribution.confidence_counts.reshape(20, -1).sum(axis=1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(np.arange(20) / 20 + 0.025, hist, width=0.05, edgecolor="black", color="#228833")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    return "confidence", "Confidence of every labelled row", _png(fig)


def reliability_line(ax, cal: dict, colour: str, label: str) -> None:
    """Accuracy against mean confidence per calibration bin, each point sized by its rows."""
    rows = np.array(cal["rows"])
    filled = rows > 0
    ax.plot(np.array(cal["confidence"])[filled], np.array(cal["accuracy"])[filled], "-",
            color=colour, label=label)
    ax.scatter(np.array(cal["confidence"])[filled], np.array(cal["accuracy"])[filled],
               s=20 + 200 * rows[filled] / rows.sum(), color=colour, zorder=3)


def render_html(m: dict, t: Tally, markdown: str, task) -> str:
    """The page: the `task`'s plots, then the text report (report.md) as preformatted text."""
    parts = [f'<figure id="{key}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}">'
             f"<figcaption>{html.escape(caption)}</figcaption></figure>"
             for key, caption, png in figures(m, t, task)]
    key = task.ranked_by
    headline = f"{key.replace('f1_', '').replace('macro', 'macro-F1')} " + (
        "n/a" if m[key] is None else f"{m[key]:.4f}")
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>Classification report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "figure{display:inline-block;vertical-align:top;margin:1em}img{max-width:100%}"
        "pre{background:#f6f6f6;padding:1em;overflow-x:auto}</style></head><body>",
        f"<h1>Classification report</h1><p>{m['rows']} rows, {m['rows_scored']} scored, "
        f"{headline}</p>",
        *parts, "<h2>The text report</h2>", f"<pre>{html.escape(markdown)}</pre>", "</body></html>"])
