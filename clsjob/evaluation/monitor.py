"""Label drift between runs: every run's manifest records its label distribution and its
confidence histogram (`distribution`), and a run given `monitor.baseline` compares its own
against that run's (`drift`): population stability index and Jensen-Shannon divergence of
the label shares, the shift of the mean confidence, and the share of rows under the review
threshold. Past `monitor.fail_above`, the run fails — after every output is written.
"""
from __future__ import annotations

import logging

import numpy as np

from clsjob import store
from clsjob.config import MonitorConfig, StorageConfig
from clsjob.contract import MANIFEST
from clsjob.evaluation.tally import COVERAGE_BINS, Tally, binned
from clsjob.labels import LabelSet

log = logging.getLogger("clsjob")
# A label share of 0 on one side makes PSI infinite; shares are floored at this first.
SHARE_FLOOR = 1e-4
HISTOGRAM_BINS = 20  # the manifest's readable histogram; the 1,000 bins are kept beside it


class DriftAlert(RuntimeError):
    """The run's labels drifted past monitor.fail_above; every output is written."""


def distribution(labels: LabelSet, t: Tally, task) -> dict:
    """What the manifest records of the run's labels and confidences (every labelled row).
    In a multi-label run a row counts once for each label it was given (shares are of the
    labels given); rows_labelled counts rows (task.labelled_rows)."""
    d = t.distribution
    rows = task.labelled_rows(t)
    with_conf = int(d.confidence_counts.sum())
    return {
        "rows_labelled": rows,
        "labels": {name: int(n) for name, n in zip(labels.names, d.label_counts)},
        "mean_confidence": d.confidence_sum / with_conf if with_conf else None,
        "confidence_histogram": d.confidence_counts.reshape(HISTOGRAM_BINS, -1).sum(axis=1).tolist(),
        "confidence_counts": [[int(i), int(d.confidence_counts[i])]
                              for i in np.flatnonzero(d.confidence_counts)],
    }


def shares(counts: dict[str, int], names: list[str]) -> np.ndarray:
    values = np.array([counts.get(n, 0) for n in names], dtype=np.float64)
    total = values.sum()
    return values / total if total else np.full(len(names), 1 / max(len(names), 1))


def psi(p: np.ndarray, q: np.ndarray) -> float:
    """Population stability index sum((p - q) ln(p / q)), shares floored at SHARE_FLOOR."""
    p, q = np.maximum(p, SHARE_FLOOR), np.maximum(q, SHARE_FLOOR)
    return float(((p - q) * np.log(p / q)).sum())


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = the same, 1 = disjoint)."""
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        keep = a > 0
        return float((a[keep] * np.log2(a[keep] / m[keep])).sum())
    return (kl(p) + kl(q)) / 2


def share_under(dist: dict, below: float) -> float | None:
    """The share of rows with a confidence under `below`, from the 1,000 bins (exact at
    0.001 steps)."""
    counts = binned(dist.get("confidence_counts", []))
    total = counts.sum()
    return float(counts[: int(round(below * COVERAGE_BINS))].sum() / total) if total else None


def compare(now: dict, before: dict, monitor: MonitorConfig) -> dict:
    """The drift of this run's distribution against the baseline's, and which limits of
    monitor.fail_above it passes (`alerts`)."""
    names = sorted(set(now["labels"]) | set(before["labels"]))
    p, q = shares(now["labels"], names), shares(before["labels"], names)
    mean_now, mean_before = now["mean_confidence"], before["mean_confidence"]
    drift = {
        "psi": psi(p, q), "js": js_divergence(p, q),
        "label_shares": {n: {"now": float(a), "baseline": float(b)} for n, a, b in zip(names, p, q)},
        "mean_confidence": {"now": mean_now, "baseline": mean_before,
                            "shift": (mean_now - mean_before
                                      if mean_now is not None and mean_before is not None else None)},
        "share_under": {"below": monitor.below, "now": share_under(now, monitor.below),
                        "baseline": share_under(before, monitor.below)},
    }
    limits = monitor.fail_above
    measured = {"psi": drift["psi"], "js": drift["js"],
                "mean_confidence_shift": abs(drift["mean_confidence"]["shift"] or 0.0)}
    drift["alerts"] = [f"{key} {measured[key]:.4f} > {limit}"
                       for key, limit in limits.model_dump().items()
                       if limit is not None and measured[key] > limit]
    return drift


def drift_against_baseline(now: dict, monitor: MonitorConfig, storage: StorageConfig) -> dict | None:
    """`compare` against monitor.baseline's manifest; None without a baseline. A baseline
    that is missing or unfinished (the first night, a day that failed) is reported, not
    fatal: there is nothing to compare with."""
    if not monitor.baseline:
        return None
    url = store.join(monitor.baseline, MANIFEST)
    try:
        before = store.read_json(url, storage) if store.exists(url, storage) else None
    except Exception as exc:  # monitoring never costs the night's labels
        before = {"unreadable": f"{type(exc).__name__}: {exc}"[:300]}
    if not before or before.get("status") != "complete" or "distribution" not in before:
        why = ("no manifest" if before is None else f"unreadable ({before['unreadable']})"
               if "unreadable" in before else "the run is unfinished"
               if before.get("status") != "complete" else "no distribution (an older release)")
        log.warning("monitor: baseline %s not compared: %s", monitor.baseline, why)
        return {"baseline": monitor.baseline, "compared": False, "why": why, "alerts": []}
    drift = {"baseline": monitor.baseline, "compared": True,
             **compare(now, before["distribution"], monitor)}
    log.info("monitor: against %s: PSI %.4f, JS %.4f, mean confidence shift %s%s",
             monitor.baseline, drift["psi"], drift["js"], drift["mean_confidence"]["shift"],
             f"; ALERT: {', '.join(drift['alerts'])}" if drift["alerts"] else "")
    return drift


def raise_on_alerts(drift: dict | None, output: str) -> None:
    if drift and drift["alerts"]:
        raise DriftAlert(f"labels drifted against {drift['baseline']}: {', '.join(drift['alerts'])} "
                         f"(monitor.fail_above); every output of {output} is written")
