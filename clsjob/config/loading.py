"""YAML + `--set key.path=value` overrides + `{date}` templates -> one validated config,
and errors that name the file and the key."""
from __future__ import annotations

import hashlib
import re
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from clsjob.config.backend import BACKEND_CONFIGS
from clsjob.config.base import ConfigError, Section


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set `a.b.c=value` pairs into a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return data


DATE_TEMPLATE = re.compile(r"\{date([+-]\d+)?(?::([^}]*))?\}")


def fill_dates(data: Any, day: date | None, key: str = "") -> Any:
    """Replace `{date}` (ISO, 2026-11-29) and `{date:<strftime>}` (e.g. `{date:%Y/%m/%d}`) in
    every string of the config: one config file serves every day of a nightly schedule. An
    offset in days names another day: `{date-1}` is the day before (monitor.baseline)."""
    if isinstance(data, dict):
        return {k: fill_dates(v, day, f"{key}.{k}" if key else k) for k, v in data.items()}
    if isinstance(data, list):
        return [fill_dates(v, day, f"{key}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, str) and DATE_TEMPLATE.search(data):
        if day is None:
            raise ConfigError(f"{key}: {data!r} holds a date template; pass --date YYYY-MM-DD")
        def fill(m: re.Match) -> str:
            when = day + timedelta(days=int(m[1] or 0))
            return when.strftime(m[2]) if m[2] else when.isoformat()
        return DATE_TEMPLATE.sub(fill, data)
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), *, model: type[Section],
                day: date | None = None):
    """Read YAML (or start empty), apply overrides, fill date templates, validate; errors name
    file and key."""
    source = str(path) if path else "<overrides>"
    data: dict = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping")
    data = fill_dates(apply_overrides(data, list(overrides)), day)
    return validate(data, model=model, source=source)


def validate(data: dict, *, model: type[Section], source: str = "<config>"):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid {model.__name__}:"]
        lines += [f"  {key}: {msg}" for key, msg in map(explain, exc.errors())]
        raise ConfigError("\n".join(lines)) from None


BACKEND_KINDS = tuple(c.model_fields["kind"].default for c in BACKEND_CONFIGS)


def explain(err: dict) -> tuple[str, str]:
    """(dotted key, message) of one validation error, in the words of the config file: the
    back end chosen by `kind` is named in the message, not spliced into the key."""
    loc, kind = [], None
    for part in err["loc"]:
        if part in BACKEND_KINDS and loc and loc[-1] == "backend":
            kind = part  # pydantic's tag of the union member
            continue
        loc.append(str(part))
    key = ".".join(loc) or "(top level)"
    if err["type"] == "union_tag_invalid":
        return f"{key}.kind", (f"{err['ctx']['tag']!r} is not a back end "
                               f"(one of {', '.join(BACKEND_KINDS)})")
    if err["type"] == "extra_forbidden":
        return key, "unknown key" + (f" for backend.kind {kind}" if kind else "")
    return key, err["msg"]


def config_hash(cfg: Section, exclude: set[str] | dict | None = None) -> str:
    """Stable short hash of the validated config (less the `exclude` sections), recorded in
    every manifest."""
    return hashlib.sha256(cfg.model_dump_json(exclude=exclude).encode()).hexdigest()[:16]
