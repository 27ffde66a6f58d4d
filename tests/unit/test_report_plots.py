import numpy as np

from clsjob.evaluation.metrics import count_rows, summarize
from clsjob.evaluation.report_html import OTHER, folded_confusion, render_html, top_classes
from clsjob.labels import LabelSet
from clsjob.task import MULTI_LABEL, SINGLE_LABEL


def many_class_run(k=30, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    labels = LabelSet(tuple(f"intent_{i:02d}" for i in range(k)))
    gold = rng.zipf(1.6, size=n) % k  # a long tail, as in real intent sets
    pred = np.where(rng.random(n) < 0.7, gold, rng.integers(0, k, size=n))
    names = np.array(labels.names)
    t = count_rows(labels, names[gold].tolist(), names[pred].tolist(),
                   rng.uniform(0.3, 1, size=n).tolist(), [None] * n)
    return labels, summarize(labels, t), t, gold


def test_the_heat_map_keeps_the_most_frequent_classes_and_folds_the_rest():
    labels, m, _, gold = many_class_run()
    keep = top_classes(m, 10)
    support = np.bincount(gold, minlength=30)
    assert sorted(keep) == keep and len(keep) == 10
    assert min(support[keep]) >= max(np.delete(support, keep))
    names, folded = folded_confusion(m, keep)
    matrix = np.array(m["confusion_matrix"])
    assert names[-1] == OTHER and len(names) == 11
    assert folded.sum() == matrix.sum()  # nothing lost in the fold
    assert folded[:10, :10].tolist() == matrix[np.ix_(keep, keep)].tolist()
    assert folded[10, 10] == np.delete(np.delete(matrix, keep, 0), keep, 1).sum()


def test_the_page_is_self_contained():
    _, m, t, _ = many_class_run()
    page = render_html(m, t, "# Classification report\n<b>not markup</b>", SINGLE_LABEL)
    assert page.count('src="data:image/png;base64,') == 5  # no baseline: no drift plot
    assert "<script" not in page and "http" not in page
    assert "&lt;b&gt;not markup&lt;/b&gt;" in page  # the text report is escaped


def test_a_multilabel_page_plots_each_labels_f1_and_the_confidences():
    from clsjob.evaluation.metrics import count_multilabel_rows
    from clsjob.evaluation.report import render_report

    rng = np.random.default_rng(1)
    labels = LabelSet(("anger", "joy", "fear"))
    gold = [[n for n in labels.names if rng.random() < 0.3] for _ in range(200)]
    pred = [[n for n in labels.names if rng.random() < 0.3] for _ in range(200)]
    t = count_multilabel_rows(labels, gold, pred, rng.uniform(0, 1, 200).tolist(), [None] * 200)
    m = MULTI_LABEL.summarize(labels, t)
    report = render_report(m)
    assert "(multi-label)" in report and "## Per label" in report and "## Most confused pairs" in report
    page = render_html(m, t, report, MULTI_LABEL)
    assert 'id="per_label_f1"' in page and 'id="confidence"' in page
    assert page.count('src="data:image/png;base64,') == 2 and f"macro-F1 {m['f1_macro']:.4f}" in page
