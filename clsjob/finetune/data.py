"""Training rows: read labelled Parquet, settle the label set, tokenise into examples."""
from __future__ import annotations

import logging

from clsjob import store
from clsjob.config import FinetuneConfig, InputConfig, LabelSpec, StorageConfig
from clsjob.labels import LabelError, LabelSet
from clsjob.run.prepare import clean_text
from clsjob.store import InputError
from clsjob.task import SINGLE_LABEL, Task

log = logging.getLogger("clsjob")


def read_labelled(inp: InputConfig, storage: StorageConfig, task: Task = SINGLE_LABEL,
                  section: str = "train") -> tuple[list[str], list]:
    """(texts, gold labels) of every usable row; rows with no text or no label are skipped
    and counted, since a model cannot learn from them. A row's gold is as the `task` reads it:
    a label, or the list of its labels (an empty list is a row no label applies to, and is
    kept).

    Text goes through the same decoding and cleaning as the rows `classify` labels (binary
    columns decoded as UTF-8, broken bytes and control characters replaced), so a model is
    trained on exactly the text it will be asked about."""
    texts, golds, skipped, cleaned = [], [], 0, 0
    for shard in store.list_shards(inp.path, storage):
        table = store.read_table(shard, storage, [inp.text_column, inp.label_column])
        gold_column = table.column(inp.label_column)
        task.check_gold_type(shard, inp, gold_column.type, section)
        gold_column = task.gold(gold_column, inp.label_separator)
        text, changed = clean_text(table.column(inp.text_column))
        cleaned += sum(changed.to_pylist())
        for text, gold in zip(text.to_pylist(), gold_column.to_pylist()):
            if text is None or not text.strip() or gold is None:
                skipped += 1
                continue
            texts.append(text)
            golds.append(gold)
    if skipped:
        log.warning("finetune: skipped %d rows of %s with no text or no label", skipped, inp.path)
    if cleaned:
        log.info("finetune: cleaned %d rows of %s (invalid UTF-8 or control characters), as "
                 "classify does", cleaned, inp.path)
    if not texts:
        raise InputError(f"{inp.path}: no labelled rows to train on")
    return texts, golds


def check_inputs(cfg: FinetuneConfig) -> None:
    """Every train and eval shard has the text column and a gold column of the task's kind,
    read from the footers on the driver: a wrong file fails before a worker starts, naming
    the key and the file."""
    for section, inp in (("train", cfg.train), ("eval", cfg.eval)):
        if inp is None:
            continue
        for shard in store.inspect_shards(store.list_shards(inp.path, cfg.storage), cfg.storage):
            if shard.error:
                raise InputError(shard.error)
            for key, column in (("text_column", inp.text_column), ("label_column", inp.label_column)):
                if column not in shard.schema.names:
                    raise InputError(f"{shard.path}: {section}.{key} {column!r} is not a column "
                                     f"(columns: {sorted(shard.schema.names)})")
            Task.of(cfg.task).check_gold_type(shard.path, inp, shard.schema.field(inp.label_column).type,
                                              section)


def settle_labels(specs: list[LabelSpec] | None, train_golds: list) -> LabelSet:
    """The configured label set, or the sorted distinct gold labels of the training rows
    (a row's gold: a label, or a list of them)."""
    given = {g for gold in train_golds for g in ([gold] if isinstance(gold, str) else gold)}
    labels = LabelSet.from_specs(specs) if specs else LabelSet(tuple(sorted(given)))
    unknown = sorted(given - set(labels.names))
    if unknown:
        raise LabelError(f"training rows carry labels outside the label set: {unknown[:20]}")
    return labels


def encode(tokenizer, texts: list[str], golds: list, labels: LabelSet,
           max_length: int) -> list[dict]:
    """Examples for the HF Trainer; padding is left to the collator, per batch. A gold list
    (a multi-label row) becomes a 0/1 float per label, the targets of the binary cross-entropy;
    rows with a label outside the set (eval rows) are left out."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask, "labels": target(g, labels)}
            for ids, mask, g in zip(enc["input_ids"], enc["attention_mask"], golds)
            if (g in labels if isinstance(g, str) else all(x in labels for x in g))]


def target(gold, labels: LabelSet):
    if isinstance(gold, str):
        return labels.id_of(gold)
    return [1.0 if name in gold else 0.0 for name in labels.names]
