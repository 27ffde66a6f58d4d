"""`clsjob config KIND`: every setting of a command's config, its default and meaning, read
from the fields' own descriptions."""
from __future__ import annotations

from typing import get_args, get_origin

import yaml

from clsjob.config.base import Section


def field_reference(model: type[Section], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) of every setting of `model`, nested sections
    walked; lists of sections (labels, examples) are settings of their own. The settings of a
    union of sections (the back ends) are listed once each, marked with the kinds that have
    them where not all do."""
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + name
        # A section, an optional one (eval) or a union of them; a list of sections is one setting.
        kinds = () if get_origin(field.annotation) is list else (
            get_args(field.annotation) or (field.annotation,))
        sections = [t for t in kinds if isinstance(t, type) and issubclass(t, Section)]
        if len(sections) > 1:
            rows += union_reference(sections, key + ".")
        elif sections:
            rows += field_reference(sections[0], key + ".")
        else:
            rows.append((key, default_text(field), field.description or ""))
    return rows


def union_reference(members: list[type[Section]], prefix: str) -> list[tuple[str, str, str]]:
    owners: dict[str, list[str]] = {}
    rows: dict[str, tuple[str, str, str]] = {}
    for member in members:
        for key, default, text in field_reference(member, prefix):
            owners.setdefault(key, []).append(member.model_fields["kind"].default)
            rows.setdefault(key, (key, default, text))
    every = len(members)
    kind_first = sorted(rows.values(), key=lambda row: not row[0].endswith(".kind"))
    return [(key, default, text if len(owners[key]) == every or key.endswith(".kind")
             else f"({', '.join(owners[key])}) {text}")
            for key, default, text in kind_first]


def default_text(field) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is list:
        return "[]"
    return yaml.safe_dump(field.default).strip().removesuffix("...").strip()
