"""The prompted back end (`vllm_prompt`) on a real instruct LLM and real data: each mode's
shipped config (`configs/classify-prompt-{choice,json,score}.yaml`) with only the data, the
model, the labels, the prompt's wording and this machine's scale swapped, run zero-shot through
`run_classify` (Ray Data, one engine actor) on SST-2 dev, SMS spam and Banking77 test.

    .venv/bin/python bench/real_prompted.py [--model qwen2.5-coder-0.5b-instruct]
        [--corpora sst2,sms_spam,banking77] [--modes choice,score,json]
        [--rows 872] [--json-rows 200] [--score-rows-many-labels 100] [--out FILE.json]

Per corpus and mode: accuracy and macro-F1 from the run's own `_metrics.json`, rows/s end to
end (engine start included), rows that errored; `json`: how many reasons end mid-sentence;
`score`: ECE of the probabilities as written, then `clsjob calibrate`'s temperature fitted on
the whole output (what a user runs), and the ECE it gives out of sample — T fitted on one half
of the rows, judged on the other, both ways (the fit cannot flatter itself).

Rows: SST-2 dev in file order (all 872 by default); SMS spam and Banking77 test in a fixed
shuffle (numpy seed 0), the first --rows. `json` runs the first --json-rows of the same rows
(it generates ~50 tokens a row); `score` on many labels (Banking77: 77, sharing first tokens,
one request per node of the label trie) the first --score-rows-many-labels.
The model folder comes from `make models`.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from common import (DATA, REPO, LoadWatch, environment, environment_line, markdown_table,
                    model_folder, read_output, start_real_data_ray, write_report)

SEED = 0
MODES = ("choice", "score", "json")
# What a user would write for each corpus: one sentence of instructions and the label names
# the corpus uses (Banking77's are snake_case intents, left as they are).
PROMPTS = {
    "sst2": {"split": "dev", "shuffle": False,
             "system_prompt": "You are a careful film critic.",
             "instructions": "Label the sentiment of the movie review."},
    "sms_spam": {"split": "all", "shuffle": True,
                 "system_prompt": "You are a careful mobile network operator.",
                 "instructions": "Is this SMS message spam (unsolicited advertising, prizes, "
                                 "premium-rate offers) or ham (an ordinary personal message)?"},
    "banking77": {"split": "test", "shuffle": True,
                  "system_prompt": "You are a careful bank support agent.",
                  "instructions": "Label the customer's message with its banking intent."},
}
SENTENCE_END = re.compile(r"[.!?…]['\")\]]?$")


def corpus_rows(corpus: str, rows: int) -> pa.Table:
    """The measured rows of `corpus`: its split, in file order or a seeded shuffle."""
    spec = PROMPTS[corpus]
    table = pq.read_table(DATA / f"{corpus}.parquet", columns=["text", "label", "split"])
    table = table.filter(pc.equal(table.column("split"), spec["split"])).select(["text", "label"])
    if spec["shuffle"]:
        table = table.take(np.random.default_rng(SEED).permutation(table.num_rows))
    return table.slice(0, rows)


def classify_config(mode: str, corpus: str, labels: list[str], model: Path, shards: Path,
                    out: Path, max_model_len: int) -> tuple[dict, dict]:
    """The shipped config of `mode` with only these keys swapped; (config, what was swapped)."""
    shipped = yaml.safe_load((REPO / "configs" / f"classify-prompt-{mode}.yaml").read_text())
    cfg = json.loads(json.dumps(shipped))
    prompt = cfg["backend"]["prompt"]
    swapped = {
        ("input", "path"): str(shards), ("input", "label_column"): "label", ("labels",): labels,
        ("backend", "model"): str(model), ("backend", "max_length"): 256,
        ("backend", "prompt", "system_prompt"): PROMPTS[corpus]["system_prompt"],
        ("backend", "prompt", "instructions"): PROMPTS[corpus]["instructions"],
        ("backend", "prompt", "examples"): [],          # zero-shot: the model as it comes
        ("backend", "engine", "max_model_len"): max_model_len,
        ("resources", "actors"): 1, ("resources", "gpus_per_actor"): 0,
        ("resources", "cpus_per_actor"): 2,
        ("output", "path"): str(out), ("output", "overwrite"): True,
        ("output", "rows_per_part"): 256, ("cluster", "autoscaling"): False,
    }
    prompt.pop("examples_path", None)  # the score config's few-shot file is a user's bucket
    changed = {}
    for keys, value in swapped.items():
        section = cfg
        for k in keys[:-1]:
            section = section.setdefault(k, {})
        if section.get(keys[-1]) != value:
            changed[".".join(keys)] = value if not isinstance(value, str) or "/" not in value else "<path>"
            section[keys[-1]] = value
    return cfg, changed


def mid_sentence(reasons: list[str | None]) -> int:
    return sum(1 for r in reasons if r and not SENTENCE_END.search(r.strip()))


def score_calibration(out: Path, labels: list[str]) -> dict:
    """ECE as written; `clsjob calibrate`'s temperature on the whole output; ECE out of
    sample with T fitted on one half and judged on the other (both ways, rows in order)."""
    from clsjob.config import StorageConfig
    from clsjob.contract import GOLD
    from clsjob.evaluation.calibration import calibrate, ece
    from clsjob.evaluation.report import calibrate_output
    from clsjob.model_folder import rescale_probs

    rows = read_output(out, [GOLD, "probs"])
    keep = [i for i, (g, p) in enumerate(zip(rows.column(GOLD).to_pylist(),
                                             rows.column("probs").to_pylist())) if p and g in labels]
    gold = np.array([labels.index(rows.column(GOLD)[i].as_py()) for i in keep])
    probs = np.array([rows.column("probs")[i].as_py() for i in keep], dtype=np.float64)
    whole = calibrate_output(str(out), StorageConfig())
    logp = np.log(np.maximum(probs, 1e-45))
    halves = np.array_split(np.arange(len(gold)), 2)
    after = np.empty_like(probs)
    for fit, judged in (halves, halves[::-1]):
        t = calibrate(logp[fit], gold[fit])["temperature"]
        after[judged] = rescale_probs(probs[judged], t)
    return {"rows": len(gold), "ece_raw": round(ece(probs, gold), 4),
            "ece_calibrated_cross_fit": round(ece(after, gold), 4),
            "calibrate_temperature": whole["temperature"], "calibrate_ece_in_sample":
                [round(whole["ece_before"], 4), round(whole["ece_after"], 4)],
            "calibrate_at_bound": whole["at_bound"]}


def run_one(mode: str, corpus: str, table: pa.Table, labels: list[str], model: Path,
            work: Path, max_model_len: int) -> dict:
    from clsjob.config import ClassifyConfig, validate
    from clsjob.run.pipeline import run_classify

    shards, out = work / f"{corpus}-{mode}-in", work / f"{corpus}-{mode}-out"
    shards.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, shards / "part-0.parquet")
    cfg, changed = classify_config(mode, corpus, labels, model, shards, out, max_model_len)
    with LoadWatch() as load:
        summary = run_classify(validate(cfg, model=ClassifyConfig, source=f"real_prompted {mode}"))
    metrics = json.loads((out / "_metrics.json").read_text())
    result = {"rows": summary.rows_out, "errored": summary.rows_errored,
              "rows_per_s": round(summary.rows_per_s, 3), "wall_s": round(summary.elapsed_s, 1),
              "accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("f1_macro"),
              "ece": metrics.get("expected_calibration_error"),
              # Where a model leans on one label (SMS spam's ham), accuracy hides it: keep the
              # per-label recall and how often each label was given, for the few-label corpora.
              "per_label": {name: {"recall": round(c["recall"], 4), "support": c["support"],
                                   "predicted": c["predicted"]}
                            for name, c in metrics["per_class"].items()} if len(labels) <= 5 else None,
              "swapped": changed, "load_average": load.summary()}
    if mode == "json":
        reasons = read_output(out, ["reasoning"]).column("reasoning").to_pylist()
        lengths = [len(r) for r in reasons if r]
        result["reasoning"] = {"mid_sentence": mid_sentence(reasons),
                               "empty": sum(1 for r in reasons if not r),
                               "mean_chars": round(float(np.mean(lengths)), 1) if lengths else None}
    if mode == "score":
        result["calibration"] = score_calibration(out, labels)
    return result


def rows_for(mode: str, corpus: str, labels: list[str], args) -> int:
    if mode == "json":
        return args.json_rows
    if mode == "score" and len(labels) > 2:
        return args.score_rows_many_labels
    return args.rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--corpora", type=lambda v: v.split(","), default=list(PROMPTS))
    parser.add_argument("--modes", type=lambda v: v.split(","), default=list(MODES))
    parser.add_argument("--rows", type=int, default=872)
    parser.add_argument("--json-rows", type=int, default=200)
    parser.add_argument("--score-rows-many-labels", type=int, default=100)
    parser.add_argument("--max-model-len", type=int, default=2048,
                        help="Banking77's 77 label names take ~600 tokens of the prompt")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "real_prompted.json")
    args = parser.parse_args()
    env = environment()
    model = model_folder(args.model)
    if not start_real_data_ray():
        return 2
    work = Path(tempfile.mkdtemp(prefix="real-prompted-"))
    results: dict = {}
    try:
        for corpus in args.corpora:
            full = corpus_rows(corpus, max(args.rows, args.json_rows, args.score_rows_many_labels))
            labels = sorted(set(full.column("label").to_pylist()))
            for mode in args.modes:
                n = rows_for(mode, corpus, labels, args)
                key = f"{corpus}/{mode}"
                results[key] = run_one(mode, corpus, full.slice(0, n), labels, model, work,
                                       args.max_model_len)
                print(json.dumps({key: results[key]}), flush=True)
                # Partial results survive a run cut short.
                write_report({"environment": env, "model": args.model, "results": results},
                             args.out, "")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = []
    for key, r in results.items():
        cal = r.get("calibration")
        table.append([key, r["rows"], r["errored"], f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}",
                      f"{cal['ece_raw']:.3f} → {cal['ece_calibrated_cross_fit']:.3f} "
                      f"(T {cal['calibrate_temperature']:.2f})" if cal else None,
                      r.get("reasoning", {}).get("mid_sentence"), r["rows_per_s"],
                      r["load_average"]["mean"]])
    write_report({"environment": env, "model": args.model, "args": {k: v for k, v in vars(args).items()
                                                                    if k != "out"},
                  "results": results}, args.out, "\n".join([
        markdown_table(["corpus/mode", "rows", "errored", "accuracy", "macro-F1",
                        "ECE raw → cross-fit cal. (calibrate T)", "reasons mid-sentence",
                        "rows/s", "load"], table),
        f"\n{args.model}; {environment_line(env)}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
