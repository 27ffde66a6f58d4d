"""Prepare stage (pure): check a shard's schema, give rows ids, mark bad rows with an error.

Bad rows are never dropped: they travel to the output with `error` set and no label, so
rows out = rows in holds for every run.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clsjob.config import InputConfig
from clsjob.contract import (CLEANED, DERIVED_ID, GOLD, PART, PART_ROWS, RESULT_COLUMNS,
                             RESULT_FIELDS, SHARD, id_column, part_name)
from clsjob.store import InputError, ShardInfo
from clsjob.task import SINGLE_LABEL, Task, is_string

# C0 and C1 control characters and DEL, except tab, newline and carriage return: they carry no
# meaning for a classifier and some tokenizers and downstream readers choke on them.
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"


def needed_columns(cfg: InputConfig) -> list[str]:
    """The only columns read from the input."""
    cols = [cfg.id_column, cfg.text_column, cfg.label_column, *cfg.carry_columns]
    return list(dict.fromkeys(c for c in cols if c))


def _is_text(t: pa.DataType) -> bool:
    # Raw bytes are accepted as text too: they are decoded as UTF-8 by clean_text.
    return is_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def check_schema(shard: ShardInfo, cfg: InputConfig, task: Task = SINGLE_LABEL) -> None:
    """Fail before any model loads when a shard cannot serve this config."""
    names = set(shard.schema.names)
    for key, col in [("input.text_column", cfg.text_column), ("input.id_column", cfg.id_column),
                     ("input.label_column", cfg.label_column)] + [
                         ("input.carry_columns", c) for c in cfg.carry_columns]:
        if col and col not in names:
            raise InputError(f"{shard.path}: {key} {col!r} is not a column "
                             f"(columns: {sorted(names)})")
    if not _is_text(shard.schema.field(cfg.text_column).type):
        raise InputError(f"{shard.path}: input.text_column {cfg.text_column!r} has type "
                         f"{shard.schema.field(cfg.text_column).type}, expected string")
    if cfg.label_column:
        task.check_gold_type(shard.path, cfg, shard.schema.field(cfg.label_column).type)
    reserved = set(RESULT_COLUMNS) | ({GOLD} if cfg.label_column else set())
    kept = [cfg.id_column, cfg.text_column, *cfg.carry_columns]
    clash = [c for c in kept if c and (c in reserved or c.startswith("_"))]
    if not cfg.id_column and DERIVED_ID in cfg.carry_columns:
        clash.append(DERIVED_ID)
    if clash:
        raise InputError(f"input columns {clash} would collide with the output's own columns "
                         f"{sorted(reserved)} / the derived '{DERIVED_ID}' / names starting with "
                         f"'_'; rename them in the input or set input.id_column")


def clean_text(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Text as valid UTF-8 without control characters, and which rows had to be changed.

    Parquet readers do not validate UTF-8, so bad bytes arrive silently and would crash the
    first Python decode. Invalid sequences become U+FFFD and control characters a space; the
    row is still classified and counted as cleaned, never dropped."""
    arr = column.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    raw = arr.view(pa.large_binary() if arr.type in (pa.large_string(), pa.large_binary())
                   else pa.binary())
    try:
        text = raw.view(pa.string() if raw.type == pa.binary() else pa.large_string())
        text.validate(full=True)
        bad_utf8 = pa.array(np.zeros(len(arr), dtype=bool))
    except pa.ArrowInvalid:
        # Rare: decode row by row, replacing only the broken sequences.
        values = raw.to_pylist()
        decoded = [None if v is None else v.decode("utf-8", "replace") for v in values]
        bad_utf8 = pa.array([v is not None and d.encode() != v for v, d in zip(values, decoded)])
        text = pa.array(decoded, pa.string())
    text = pc.cast(text, pa.string())
    has_control = pc.fill_null(pc.match_substring_regex(text, CONTROL_CHARS), False)
    cleaned = pc.or_(bad_utf8, has_control)
    return pc.replace_substring_regex(text, CONTROL_CHARS, " "), cleaned


def prepare_chunk(table: pa.Table, shard_key: str, start_row: int, cfg: InputConfig,
                  task: Task = SINGLE_LABEL) -> pa.Table:
    """Input chunk -> id, text, gold (as the `task` reads it), carried columns, error, and the
    part bookkeeping."""
    n = table.num_rows
    if cfg.id_column:
        ids = table.column(cfg.id_column)
    else:
        ids = pa.array([f"{shard_key}:{start_row + i}" for i in range(n)], pa.string())
    text, cleaned = clean_text(table.column(cfg.text_column))
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)
    error = pc.if_else(pc.is_null(text), "text is null",
                       pc.if_else(pc.fill_null(empty, False), "text is empty",
                                  pa.scalar(None, RESULT_FIELDS["error"])))
    columns = {id_column(cfg): ids, cfg.text_column: text}
    if cfg.label_column:
        gold = table.column(cfg.label_column)
        columns[GOLD] = task.gold(gold, cfg.label_separator)
    for col in cfg.carry_columns:
        columns.setdefault(col, table.column(col))
    columns["error"] = error
    columns[SHARD] = pa.array([shard_key] * n, pa.string())
    columns[PART] = pa.array([part_name(shard_key, start_row)] * n, pa.string())
    columns[PART_ROWS] = pa.array([n] * n, pa.int64())
    columns[CLEANED] = cleaned
    return pa.table(columns)
