"""The task of a run as one object: single_label (one label a row) or multi_label (the labels
that apply to a row: none, one or several).

What differs between the two lives here: the gold column's type and how it is read, the
output column that holds the answer and how probabilities become it, the counts and the
metrics they make, the headline numbers, the report's sections, and what a fine-tuned head
is. `Task.of(cfg.task)`, built where a command starts, is handed down to whatever needs it;
nothing else asks which task a run is. Where a module keeps its own code for each task (a
prompt's wording, a trainer's loss), `task.pick(single, multi)` lets the task choose."""
from __future__ import annotations

from typing import ClassVar, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clsjob import model_folder
from clsjob.evaluation import metrics, multilabel, report_html, report_markdown
from clsjob.evaluation.review import uncertainty
from clsjob.evaluation.tally import Tally
from clsjob.labels import LabelSet
from clsjob.store import InputError

T = TypeVar("T")


def is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_string_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and is_string(t.value_type)


class Task:
    """What a task decides. Each of the two below implements, beside the attributes here:
    check_gold_type and gold (the input's gold column), tally / count / summarize (counts
    and metrics), model_thresholds, decide, probabilities and scaled (a head's outputs →
    answers), review_scores, report and figures, check_calibration, and pick."""

    name: ClassVar[str]  # as the config and the manifest write it
    answer: ClassVar[str]  # the output column of a row's answer
    answer_columns: ClassVar[tuple[str, ...]]  # what counting a written part reads of it
    headline: ClassVar[tuple[str, ...]]  # what `clsjob evaluate` prints
    summary_keys: ClassVar[tuple[str, ...]]  # the run's summary table
    ranked_by: ClassVar[str]  # the metric keep_best ranks epochs by; report.html's headline
    # transformers' config.json problem_type of a head fine-tuned for the task (None: the one
    # transformers infers, a softmax over the labels).
    problem_type: ClassVar[str | None]

    @staticmethod
    def of(name: str) -> "Task":
        return TASKS[name]

    @staticmethod
    def of_metrics(metrics: dict) -> "Task":
        """The task of a run's _metrics.json (only a multi-label run's names it)."""
        return TASKS[metrics.get("task", SingleLabel.name)]

    @staticmethod
    def trained(config: dict) -> "Task":
        """The task a model folder's head was fine-tuned for, from its config.json."""
        return next((t for t in TASKS.values() if t.problem_type == config.get("problem_type")),
                    TASKS[SingleLabel.name])

    def pick(self, single: T, multi: T) -> T:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other) -> bool:  # an actor's copy (pickled) is the same task
        return isinstance(other, Task) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def tally(self, n_labels: int) -> Tally:
        """No rows counted yet."""
        return Tally(n_labels)

    def count(self, labels: LabelSet, part: pa.Table, gold_column: str | None,
              temperature: float | None = None) -> Tally:
        """The counts of one written part (the output contract). Without a gold column every
        row counts as having no gold label."""
        raise NotImplementedError

    def labelled_rows(self, t: Tally) -> int:
        """Rows that were given an answer (the run's distribution)."""
        return int(t.distribution.label_counts.sum())

    def gold_of(self, part: pa.Table, gold_column: str | None) -> list:
        return (part.column(gold_column).to_pylist()
                if gold_column and gold_column in part.column_names else [None] * part.num_rows)


class SingleLabel(Task):
    name = "single_label"
    answer = "label"
    answer_columns = ("label", "probs")
    headline = ("accuracy", "f1_macro", "f1_weighted")
    summary_keys = ("accuracy",)
    ranked_by = "accuracy"
    problem_type = None

    def pick(self, single: T, multi: T) -> T:
        return single

    def check_gold_type(self, path: str, inp, t: pa.DataType, section: str = "input") -> None:
        """Gold labels are a string. `section`: the config's name for `inp` (input, or
        finetune's train and eval)."""
        if not is_string(t):
            hint = " (a list of labels is task: multi_label)" if is_string_list(t) else ""
            raise InputError(f"{path}: {section}.label_column {inp.label_column!r} has type {t}, "
                             f"expected string{hint}")

    def gold(self, column: pa.ChunkedArray, separator: str | None) -> pa.Array:
        return pc.cast(column, pa.string())

    def count(self, labels, part, gold_column, temperature=None) -> Tally:
        column = lambda name: part.column(name).to_pylist()  # noqa: E731
        return metrics.count_rows(labels, self.gold_of(part, gold_column), column("label"),
                                  column("confidence"), column("error"), column("probs"), temperature)

    def summarize(self, labels: LabelSet, t: Tally, target_accuracy: float | None = None) -> dict:
        return metrics.summarize(labels, t, target_accuracy)

    def model_thresholds(self, config: dict, labels: LabelSet, model: str) -> None:
        """A softmax head decides by its top label: no thresholds."""
        return None

    def decide(self, probs: np.ndarray, thresholds=None) -> tuple[list[int], np.ndarray]:
        """Each row's answer (its top label's index) and confidence (that label's probability)."""
        best = probs.argmax(axis=1)
        return [int(k) for k in best], probs[np.arange(len(best)), best]

    def probabilities(self, logits, temperature: float):
        """softmax(logits / temperature) over the labels (torch)."""
        import torch
        return torch.softmax(logits / temperature, dim=-1)

    def scaled(self, probs: np.ndarray, temperature: float) -> np.ndarray:
        """softmax(logits / T) from the softmax(logits) a server returns."""
        return model_folder.rescale_probs(probs, temperature)

    def review_scores(self, probs: np.ndarray, confidence: list[float], strategy: str) -> np.ndarray:
        """Higher = review first: review.uncertainty's `strategy` of each row's probabilities."""
        return uncertainty(probs, strategy)

    def report(self, m: dict) -> str:
        return report_markdown.single_label_report(m)

    def check_calibration(self, output: str) -> None:
        """`clsjob calibrate` fits a temperature on the run's probabilities."""

    def figures(self, m: dict, t: Tally, plt) -> list:
        return report_html.single_label_figures(m, t, plt)


class MultiLabel(Task):
    name = "multi_label"
    answer = "labels"
    answer_columns = ("labels",)
    headline = ("f1_micro", "f1_macro", "subset_accuracy")
    summary_keys = ("f1_macro", "f1_micro")
    ranked_by = "f1_macro"
    problem_type = "multi_label_classification"  # transformers': a sigmoid and BCE per label

    def pick(self, single: T, multi: T) -> T:
        return multi

    def check_gold_type(self, path: str, inp, t: pa.DataType, section: str = "input") -> None:
        """Gold labels are a list of strings, or a string the config says how to split."""
        key, col = f"{section}.label_column", inp.label_column
        if is_string(t) and inp.label_separator is None:
            raise InputError(f"{path}: {key} {col!r} is a string column, but task: multi_label "
                             f"needs a list<string> column or {section}.label_separator to split it")
        if not (is_string_list(t) or is_string(t)):
            raise InputError(f"{path}: {key} {col!r} has type {t}, expected list<string> "
                             f"(task: multi_label)")

    def gold(self, column: pa.ChunkedArray, separator: str | None) -> pa.Array:
        """Gold labels as list<string>: a list column as it is, a string column split at
        `separator` (pieces trimmed; an empty string = no label applies). Null stays null."""
        arr = column.combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if is_string(arr.type):
            arr = pa.array([None if v is None else [x.strip() for x in v.split(separator) if x.strip()]
                            for v in arr.to_pylist()], pa.list_(pa.string()))
        return arr.cast(pa.list_(pa.string()))

    def tally(self, n_labels: int) -> Tally:
        # With no scored row the run still reports multi-label metrics (all None).
        return Tally(n_labels, multilabel=multilabel.MultiLabelTally(n_labels))

    def labelled_rows(self, t: Tally) -> int:
        # A row may be given several labels, or none: the rows that did not error.
        return int(t.rows.total - t.rows.errored)

    def count(self, labels, part, gold_column, temperature=None) -> Tally:
        column = lambda name: part.column(name).to_pylist()  # noqa: E731
        return metrics.count_multilabel_rows(labels, self.gold_of(part, gold_column), column("labels"),
                                             column("confidence"), column("error"))

    def summarize(self, labels: LabelSet, t: Tally, target_accuracy: float | None = None) -> dict:
        return {"task": self.name, **metrics.summarize_multilabel_run(labels, t)}

    def model_thresholds(self, config: dict, labels: LabelSet, model: str) -> np.ndarray:
        """Each label's decision threshold (in `labels`' order), from the model folder."""
        return model_folder.thresholds(config, labels, model)

    def decide(self, probs: np.ndarray, thresholds=None) -> tuple[list[list[int]], np.ndarray]:
        """Each row's answer (the indices of the labels at or over their threshold) and
        confidence (multilabel.decide: the closest call's distance from its threshold)."""
        applies, confidence = multilabel.decide(probs, thresholds)
        return [np.flatnonzero(a).tolist() for a in applies], confidence

    def probabilities(self, logits, temperature: float):
        """An independent sigmoid per label (torch); no temperature: the thresholds do that job."""
        import torch
        return torch.sigmoid(logits)

    def scaled(self, probs: np.ndarray, temperature: float) -> np.ndarray:
        return probs  # a sigmoid per label, as the server returns it

    def review_scores(self, probs: np.ndarray, confidence: list[float], strategy: str) -> np.ndarray:
        # The least confident rows first (the closest call to a threshold): the only
        # strategy a set of labels allows.
        return 1.0 - np.asarray(confidence, dtype=np.float64)

    def report(self, m: dict) -> str:
        return report_markdown.multilabel_report(m)

    def check_calibration(self, output: str) -> None:
        raise InputError(f"{output}: a task: multi_label run has a threshold per label, not a "
                         f"temperature; `clsjob finetune` tunes the thresholds on its eval rows")

    def figures(self, m: dict, t: Tally, plt) -> list:
        return report_html.multilabel_figures(m, t, plt)


SINGLE_LABEL, MULTI_LABEL = SingleLabel(), MultiLabel()
TASKS: dict[str, Task] = {task.name: task for task in (SINGLE_LABEL, MULTI_LABEL)}
