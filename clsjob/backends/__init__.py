"""Classification back ends. Each is a Ray Data actor class: a heavy `__init__` that loads the
model once, and a thin `__call__(chunk) -> chunk` over pure functions in the same module."""
from __future__ import annotations

from clsjob.config import BackendConfig
from clsjob.labels import LabelSet


class ModelError(ValueError):
    """A model folder that cannot serve this job; the message names the folder."""


def actor_class(backend: BackendConfig) -> type:
    # Imported lazily: a back end's heavy dependencies load only when it is used.
    if backend.kind == "hf":
        from clsjob.backends.hf import HFClassifier
        return HFClassifier
    raise ValueError(f"backend.kind: unknown back end {backend.kind!r}")


def check_model(backend: BackendConfig, configured: LabelSet | None) -> LabelSet:
    """Validate the model and the labels on the driver, before any row is read; return the
    label set in output order."""
    if backend.kind == "hf":
        from clsjob.backends.hf import check_model_folder
        return check_model_folder(backend, configured)
    raise ValueError(f"backend.kind: unknown back end {backend.kind!r}")
