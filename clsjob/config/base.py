"""What every command's config is made of: the section base (frozen, unknown keys refused),
the config error, the task, storage and labels."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


# single_label: each row gets exactly one label; multi_label: each row gets the set of labels
# that apply (possibly none), one independent yes/no decision per label.
TaskName = Literal["single_label", "multi_label"]  # task.py: the Task each names
TASK = Field("single_label", description="single_label = one label a row; multi_label = every "
                                         "label that applies, possibly none (one sigmoid per "
                                         "label, thresholds tuned on the eval rows).")


class Section(BaseModel):
    # frozen: a run never mutates its config; extra="forbid": a typo is an error, not a default.
    model_config = ConfigDict(frozen=True, extra="forbid")


class StorageConfig(Section):
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph, a test server). None = AWS.")
    region: str | None = Field(None, description="S3 region; None = the AWS chain's default.")
    max_attempts: int = Field(
        10, ge=1, description="Tries per S3 request on throttling (SlowDown), 5xx answers and "
                              "dropped connections, with exponential backoff and jitter.")
    model_cache: str = Field(
        "~/.cache/clsjob/models", description="Local folder on every node where models given "
                                              "as s3:// are fetched, once per node and model.")
    # No credential fields on purpose: keys come only from the environment or the AWS chain,
    # so they can never end up in a config file, a manifest or a log line.


class LabelSpec(Section):
    name: str = Field(min_length=1, description="Label name as written to the output.")
    description: str | None = Field(None, description="What the label means (for prompts).")


def _labels_from_strings(value: Any) -> Any:
    # `labels: [neg, pos]` is the common case; descriptions are optional.
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


# A label list written as plain names or as {name, description} mappings.
Labels = Annotated[list[LabelSpec] | None, BeforeValidator(_labels_from_strings)]
