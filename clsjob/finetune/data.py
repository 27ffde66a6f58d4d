"""Training rows: read labelled Parquet, settle the label set, tokenise into examples."""
from __future__ import annotations

import logging

from clsjob import store
from clsjob.config import InputConfig, LabelSpec, StorageConfig
from clsjob.store import InputError
from clsjob.labels import LabelError, LabelSet
from clsjob.prepare import clean_text

log = logging.getLogger("clsjob")


def read_labelled(inp: InputConfig, storage: StorageConfig) -> tuple[list[str], list[str]]:
    """(texts, gold labels) of every usable row; rows with no text or no label are skipped
    and counted, since a model cannot learn from them.

    Text goes through the same decoding and cleaning as the rows `classify` labels (binary
    columns decoded as UTF-8, broken bytes and control characters replaced), so a model is
    trained on exactly the text it will be asked about."""
    texts, golds, skipped, cleaned = [], [], 0, 0
    for shard in store.list_shards(inp.path, storage):
        table = store.read_table(shard, storage, [inp.text_column, inp.label_column])
        text, changed = clean_text(table.column(inp.text_column))
        cleaned += sum(changed.to_pylist())
        for text, gold in zip(text.to_pylist(), table.column(inp.label_column).to_pylist()):
            if text is None or not text.strip() or gold is None:
                skipped += 1
                continue
            texts.append(text)
            golds.append(str(gold))
    if skipped:
        log.warning("finetune: skipped %d rows of %s with no text or no label", skipped, inp.path)
    if cleaned:
        log.info("finetune: cleaned %d rows of %s (invalid UTF-8 or control characters), as "
                 "classify does", cleaned, inp.path)
    if not texts:
        raise InputError(f"{inp.path}: no labelled rows to train on")
    return texts, golds


def settle_labels(specs: list[LabelSpec] | None, train_golds: list[str]) -> LabelSet:
    """The configured label set, or the sorted distinct gold labels of the training rows."""
    labels = LabelSet.from_specs(specs) if specs else LabelSet(tuple(sorted(set(train_golds))))
    unknown = sorted(set(train_golds) - set(labels.names))
    if unknown:
        raise LabelError(f"training rows carry labels outside the label set: {unknown[:20]}")
    return labels


def encode(tokenizer, texts: list[str], golds: list[str], labels: LabelSet,
           max_length: int) -> list[dict]:
    """Examples for the HF Trainer; padding is left to the collator, per batch."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask, "labels": labels.id_of(g)}
            for ids, mask, g in zip(enc["input_ids"], enc["attention_mask"], golds)
            if g in labels]
