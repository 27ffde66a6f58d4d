"""A cascade of back ends (`backend.kind: cascade`): the first stage labels every row, and each
later stage labels only the rows the stage before it was unsure of, so the costly model sees
few rows. Each stage is its own Ray Data actor pool; a chunk stays whole through all of them
(rows a stage does not label pass through untouched), so parts, resume and the lock work as
for one back end.

The actor is thin: `escalated` (which rows go on), `merge_rows` (a later stage's results put
back into the chunk) and `stage_counts` (what the write stage adds up per stage) are pure."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clsjob import backends
from clsjob.config import ClassifyConfig, Stage
from clsjob.contract import BUSY, DTYPE, LABELLED_BY, RESULT_FIELDS

# Internal columns: rows going on to the next stage, the first stage's label of every row
# (so the first stage alone is scored too), and per stage whether it ran on the row and the
# row's share of the call's seconds (a batch may hold several parts: counts go per row).
ESCALATE, FIRST_LABEL = "_escalate", "_first_label"


def ran_column(position: int) -> str:
    return f"_stage{position}_ran"


def busy_column(position: int) -> str:
    return f"_stage{position}_busy_s"


def escalated(table: pa.Table, below: float | None, margin_below: float | None) -> np.ndarray:
    """Rows labelled without an error whose confidence (or top-1 minus top-2 probability) is
    under the threshold. Rows in error (empty text, a failed answer) are not sent on."""
    labelled = pc.and_(pc.is_null(table.column("error")), pc.is_valid(table.column("label")))
    labelled = labelled.to_numpy(zero_copy_only=False).astype(bool)
    if below is not None:
        confidence = table.column("confidence").to_numpy(zero_copy_only=False)
        return labelled & (np.nan_to_num(confidence.astype(np.float64), nan=1.0) < below)
    out = np.zeros(table.num_rows, dtype=bool)
    probs = table.column("probs").to_pylist()
    for i in np.flatnonzero(labelled):
        if probs[i] is not None and len(probs[i]) > 1:
            top = np.sort(np.asarray(probs[i], dtype=np.float64))[-2:]
            out[i] = top[1] - top[0] < margin_below
    return out


def merge_rows(table: pa.Table, rows: np.ndarray, labelled: pa.Table, columns: list[str]) -> pa.Table:
    """`table` with `columns` of its rows at positions `rows` taken from `labelled` (row j of
    `labelled` is row rows[j]); a column `table` lacks is added, null elsewhere."""
    n = table.num_rows
    mapping = np.arange(n)
    mapping[rows] = n + np.arange(len(rows))
    index = pa.array(mapping)
    out = table
    for name in columns:
        kind = RESULT_FIELDS.get(name, labelled.schema.field(name).type)
        old = (table.column(name).cast(kind).combine_chunks() if name in table.column_names
               else pa.nulls(n, kind))
        merged = pa.concat_arrays([old, labelled.column(name).cast(kind).combine_chunks()]).take(index)
        out = (out.set_column(out.column_names.index(name), name, merged) if name in out.column_names
               else out.append_column(name, merged))
    return out


def with_result_columns(table: pa.Table) -> pa.Table:
    """Every result column present (nulls where no stage filled it): a chunk no stage gave a
    reasoning still has the column the output writes."""
    for name, kind in RESULT_FIELDS.items():
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, kind))
    return table


def put(table: pa.Table, name: str, column: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, column)
    return table.append_column(name, column)


class CascadeStage:
    """Ray Data actor for one stage: the stage's own back-end actor inside, run on the rows
    this stage is for (every row at the first stage, the escalated ones after)."""

    def __init__(self, position: int, name: str, escalate_below: float | None,
                 escalate_margin_below: float | None, last: bool, actor: str, **actor_kwargs):
        self.position, self.name, self.last = position, name, last
        self.below, self.margin_below = escalate_below, escalate_margin_below
        self.inner = backends.resolve(actor)(**actor_kwargs)

    def __call__(self, table: pa.Table) -> pa.Table:
        out, rows, seconds = self.label_all(table) if self.position == 0 else self.label_escalated(table)
        out = with_result_columns(out)
        if not self.last:
            sent = escalated(out, self.below, self.margin_below)
            if self.position:  # only rows this stage labelled can go on
                sent &= out.column(ESCALATE).to_numpy(zero_copy_only=False).astype(bool)
            out = put(out, ESCALATE, pa.array(sent))
        ran = np.zeros(out.num_rows, dtype=bool)
        ran[rows] = True
        # The stage's model seconds (what its back end measured), shared by the rows it ran;
        # BUSY, the whole cascade's, gains them.
        share = np.where(ran, seconds / max(len(rows), 1), 0.0)
        if self.position:
            out = put(out, BUSY, pa.array(out.column(BUSY).to_numpy(zero_copy_only=False) + share))
        out = put(out, ran_column(self.position), pa.array(ran))
        return put(out, busy_column(self.position), pa.array(share))

    def label_all(self, table: pa.Table) -> tuple[pa.Table, np.ndarray, float]:
        """The first stage: every row not already in error."""
        rows = np.flatnonzero(pc.is_null(table.column("error")).to_numpy(zero_copy_only=False))
        out = self.inner(table)
        seconds = pc.sum(out.column(BUSY)).as_py() or 0.0
        out = out.append_column(FIRST_LABEL, out.column("label"))
        by = pc.if_else(pc.is_null(out.column("error")), pa.scalar(self.name), pa.scalar(None, pa.string()))
        return out.append_column(LABELLED_BY, by), rows, seconds

    def label_escalated(self, table: pa.Table) -> tuple[pa.Table, np.ndarray, float]:
        """A later stage: the rows sent on, the others untouched."""
        rows = np.flatnonzero(table.column(ESCALATE).to_numpy(zero_copy_only=False))
        if not len(rows):
            return table, rows, 0.0
        # The stage's back end sees the prepared rows as the first stage did.
        inputs = [c for c in table.column_names
                  if c == "error" or not (c in RESULT_FIELDS or c.startswith("_stage")
                                          or c in (DTYPE, BUSY, LABELLED_BY, FIRST_LABEL, ESCALATE))]
        done = self.inner(table.take(pa.array(rows)).select(inputs))
        done = done.append_column(LABELLED_BY, pa.array([self.name] * len(rows), pa.string()))
        columns = [c for c in done.column_names if c in RESULT_FIELDS or c in (DTYPE, LABELLED_BY)]
        return merge_rows(table, rows, done, columns), rows, pc.sum(done.column(BUSY)).as_py() or 0.0


def stage_actor_class(position: int) -> type:
    """A subclass per stage: Ray Data names each actor pool (and process) after its class, so
    the stages are told apart in the dashboard and by `ps`."""
    return type(f"CascadeStage{position + 1}", (CascadeStage,), {"__module__": __name__})


def stage_actors(cfg: ClassifyConfig, labels) -> list[tuple[Stage, type, dict]]:
    """Each stage of the run with its Ray Data actor class and constructor arguments. One
    stage is its back end's own actor, labelling every row; stages of a cascade each run
    theirs inside a CascadeStage, on the rows the stage before sent on."""
    stages = cfg.stages()
    if len(stages) == 1:
        return [(stages[0], backends.actor_class(stages[0].backend), backends.actor_kwargs(cfg, labels))]
    return [(stage, stage_actor_class(i), stage_actor_kwargs(cfg, labels, stages, i))
            for i, stage in enumerate(stages)]


def stage_actor_kwargs(cfg: ClassifyConfig, labels, stages: list[Stage], position: int) -> dict:
    """Constructor arguments of stage `position`'s actor."""
    stage = stages[position]
    return {"position": position, "name": stage.name, "escalate_below": stage.escalate_below,
            "escalate_margin_below": stage.escalate_margin_below,
            "last": position == len(stages) - 1,
            "actor": backends.REGISTRY[stage.backend.kind].actor,
            **backends.actor_kwargs(cfg, labels, stage.backend, stage.resources)}


def part_stage_counts(cfg: ClassifyConfig, chunk: pa.Table, written: pa.Table, gold: list | None,
                      labels) -> dict | None:
    """stage_counts of a written part; None with one stage (the part's own counts say it all)."""
    stages = cfg.stages()
    return stage_counts(chunk, written, [s.name for s in stages], gold, labels) if len(stages) > 1 else None


def stage_counts(chunk: pa.Table, written: pa.Table, names: list[str], gold: list | None,
                 labels) -> dict:
    """Per stage, what one written part adds: rows it ran on, rows whose label it gave, its
    busy seconds, and with gold labels its scored and correct rows; and the first stage's
    own label of every row scored (`first_alone`), so the cascade is compared with it."""
    by = written.column(LABELLED_BY).to_pylist()
    label = written.column("label").to_pylist()
    counts = {}
    for i, name in enumerate(names):
        mine = [j for j, b in enumerate(by) if b == name]
        entry = {"ran": int(pc.sum(chunk.column(ran_column(i))).as_py() or 0),
                 "labelled": len(mine), "busy_s": float(pc.sum(chunk.column(busy_column(i))).as_py() or 0)}
        if gold is not None:
            scored = [j for j in mine if gold[j] in labels and label[j] is not None]
            entry |= {"scored": len(scored), "correct": sum(label[j] == gold[j] for j in scored)}
        counts[name] = entry
    if gold is not None:
        first = chunk.column(FIRST_LABEL).to_pylist()
        scored = [j for j, g in enumerate(gold) if g in labels and first[j] is not None]
        counts["first_alone"] = {"scored": len(scored), "correct": sum(first[j] == gold[j] for j in scored)}
    return counts


def add_counts(total: dict, part: dict) -> dict:
    """Stage counts add up across parts and shards."""
    out = {name: dict(entry) for name, entry in total.items()}
    for name, entry in part.items():
        into = out.setdefault(name, {})
        for key, value in entry.items():
            into[key] = into.get(key, 0) + value
    return out


def cascade_summary(cfg: ClassifyConfig, counts: dict, temperatures: list) -> dict | None:
    """The manifest's (and metrics') CASCADE section: per stage its model, rule, rows, rows/s
    of its busy time, and accuracy on the rows it labelled; the first stage alone beside
    them. None with one stage."""
    if len(cfg.stages()) == 1:
        return None
    stages = []
    for stage, temperature in zip(cfg.stages(), temperatures):
        name = stage.name
        c = counts.get(name, {})
        entry = {"name": name, "kind": stage.backend.kind, "model": stage.backend.model,
                 "escalate_below": stage.escalate_below,
                 "escalate_margin_below": stage.escalate_margin_below, "temperature": temperature,
                 # what the pool ran with (placement.size_cpu_stages may have sized it)
                 "actors": stage.resources.actors, "cpus_per_actor": stage.resources.cpus_per_actor,
                 "rows_ran": c.get("ran", 0), "rows_labelled": c.get("labelled", 0),
                 "busy_s": round(c.get("busy_s", 0.0), 3),
                 "rows_per_busy_s": round(c["ran"] / c["busy_s"], 2) if c.get("busy_s") else None}
        if "scored" in c:
            entry["accuracy_on_its_rows"] = c["correct"] / c["scored"] if c["scored"] else None
        stages.append(entry)
    out = {"stages": stages}
    if "first_alone" in counts:
        first = counts["first_alone"]
        out["first_stage_alone_accuracy"] = first["correct"] / first["scored"] if first["scored"] else None
    ran = sum(s["rows_ran"] for s in stages[1:])
    out["escalated_rows"] = ran
    out["escalated_share"] = ran / stages[0]["rows_ran"] if stages[0]["rows_ran"] else None
    return out
