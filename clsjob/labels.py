"""The label set: names in output order, descriptions, and name <-> id."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from clsjob.config import LabelSpec


class LabelError(ValueError):
    """The configured labels and the model's labels disagree, or a label set is malformed."""


@dataclass(frozen=True)
class LabelSet:
    names: tuple[str, ...]
    descriptions: tuple[str | None, ...] = ()
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.names:
            raise LabelError("the label set is empty")
        dupes = sorted({n for n in self.names if self.names.count(n) > 1})
        if dupes:
            raise LabelError(f"duplicate label names: {dupes}")
        if not self.descriptions:
            object.__setattr__(self, "descriptions", (None,) * len(self.names))
        self._index.update({name: i for i, name in enumerate(self.names)})

    @classmethod
    def from_specs(cls, specs: Iterable[LabelSpec]) -> "LabelSet":
        specs = list(specs)
        return cls(tuple(s.name for s in specs), tuple(s.description for s in specs))

    @classmethod
    def from_id2label(cls, id2label: Mapping) -> "LabelSet":
        # HF configs round-trip id2label through JSON, so ids may arrive as strings.
        ids = sorted(int(i) for i in id2label)
        if ids != list(range(len(ids))):
            raise LabelError(f"id2label ids are not 0..{len(ids) - 1}: {ids}")
        by_id = {int(i): name for i, name in id2label.items()}
        return cls(tuple(by_id[i] for i in ids))

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def id_of(self, name: str) -> int:
        return self._index[name]

    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    def label2id(self) -> dict[str, int]:
        return dict(self._index)


def resolve_model_labels(configured: LabelSet | None, model_labels: LabelSet) -> tuple[LabelSet, list[int]]:
    """Return the output label order and, for each output label, its column in the model's logits.

    The config may list the model's labels in another order (the output follows the config);
    any name missing on either side is an error, raised before a row is read.
    """
    if configured is None:
        return model_labels, list(range(len(model_labels)))
    missing = [n for n in configured.names if n not in model_labels]
    extra = [n for n in model_labels.names if n not in configured]
    if missing or extra:
        raise LabelError(
            f"labels in the config do not match the model's id2label: "
            f"not in the model {missing}, not in the config {extra} "
            f"(model labels: {list(model_labels.names)})")
    return configured, [model_labels.id_of(n) for n in configured.names]
