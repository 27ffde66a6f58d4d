"""Readers for what experiment trackers leave on disk, so a test can check what was logged
without a server: TensorBoard event files (TFRecord framing around tensorboardX's Event
protos) and an offline W&B run (LevelDB-style log blocks around W&B's Record protos)."""
from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path


def tensorboard_events(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str]]:
    """({scalar tag: [(step, value)]}, {text tag: text}) over every event file in `folder`."""
    from tensorboardX.proto import event_pb2

    scalars, texts = defaultdict(list), {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        raw, pos = path.read_bytes(), 0
        while pos < len(raw):  # u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", raw[pos:pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
            pos += 16 + length
            for value in event.summary.value:
                if value.HasField("tensor") and value.tensor.string_val:
                    texts[value.tag] = value.tensor.string_val[0].decode()
                elif value.HasField("simple_value") or value.WhichOneof("value") == "simple_value":
                    scalars[value.tag].append((event.step, value.simple_value))
    return dict(scalars), texts


def wandb_offline_run(folder: Path) -> dict:
    """The history rows, final summary and config of the one offline run under `folder`."""
    from wandb.proto import wandb_internal_pb2

    (path,) = folder.rglob("offline-run-*/run-*.wandb")
    raw, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []  # 7: file header
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    history, summary, config = [], {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "summary":
            summary.update({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                            for item in record.summary.update})
        elif kind in ("config", "run"):
            items = record.config.update if kind == "config" else record.run.config.update
            config.update({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                           for item in items})
    return {"history": history, "summary": summary, "config": config}
