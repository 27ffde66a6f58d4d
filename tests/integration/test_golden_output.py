"""A run's output does not change when the code is reshaped: the same part files, schema,
rows, manifest, metrics and report as a run of the code before the restructuring (commit
2b296a9), kept in tests/golden/classify-hf.json. Timestamps, run ids, rates and anything that
names a temporary path are left out; floats compare within 1e-5 (CPUs' kernels differ in the
last bits), so the model runs in float32 on every CPU. Since then the manifest has gained the
dtype each part ran in (`dtypes`, and `dtype` per part), added to the file by hand, and the
metrics and report their accuracy-against-coverage table, then the manifest its `temperature`
(1.0: the tiny model carries none), `abstain` and `review` (null: not asked for), and the
metrics and report the negative log-likelihood, then the manifest its `distribution` and
`drift` (null: no baseline) and the metrics `uncalibrated` (null: T is 1), each taken from a run of the code that added it (nothing else in
the file changed). To write the golden file with some other version of
clsjob on the path:

    PYTHONPATH=<that checkout>:tests python tests/integration/test_golden_output.py OUT.json
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clsjob.config import ClassifyConfig, validate
from clsjob.run.pipeline import run_classify
from helpers import LABELS, REPO, sample_texts, write_shards

GOLDEN = REPO / "tests" / "golden" / "classify-hf.json"
# What changes from run to run (or names a temporary folder), left out of the comparison.
VOLATILE = {"run_id", "config_hash", "work_hash", "model", "rows_per_s", "elapsed_s",
            "started_at", "finished_at", "busy"}


def golden_corpus(folder: Path) -> Path:
    """Two shards with every kind of row the contract speaks of: bad rows, invalid UTF-8 and
    control characters, an over-long text, gold labels outside the label set."""
    shards = []
    for s in range(2):
        texts = sample_texts(40, seed=s) + [None, "", "   "]
        texts[3] = "the film was a delight " * 60
        raw = [t.encode() if t is not None else None for t in texts]
        raw[5] = b"a gripping \xff\xfe story"
        raw[6] = b"great\x07 film\x00"
        gold = [LABELS[i % 3] for i in range(len(texts))]
        gold[7] = "sarcastic"
        shards.append({"text": pa.array(raw, pa.binary()).view(pa.string()), "label": gold,
                       "lang": ["en"] * len(texts)})
    write_shards(folder, shards)
    return folder


def golden_config(model, inp: Path, out: Path) -> ClassifyConfig:
    return validate({"input": {"path": str(inp), "label_column": "label", "carry_columns": ["lang"]},
                     "backend": {"model": str(model), "max_length": 128, "dtype": "float32"},
                     "output": {"path": str(out), "rows_per_part": 16}},
                    model=ClassifyConfig)


def output_view(out: Path) -> dict:
    parts = sorted(p.name for p in out.glob("*.parquet"))
    tables = [pq.read_table(out / p) for p in parts]
    manifest = json.loads((out / "_manifest.json").read_text())
    manifest = {k: v for k, v in manifest.items() if k not in VOLATILE}
    manifest["shards"] = [{k: v for k, v in s.items() if k != "path"} for s in manifest["shards"]]
    # Confidences counted in bins 0.001 wide: one that CPUs' last bits put on either side of
    # an edge would move a count; the 20-bin histogram and the mean stay.
    manifest.get("distribution", {}).pop("confidence_counts", None)
    metrics = json.loads((out / "_metrics.json").read_text())
    metrics.pop("rows_per_s")
    report = [line for line in (out / "report.md").read_text().splitlines() if "rows/s" not in line]
    return {"parts": parts, "schema": [f"{f.name}: {f.type}" for f in tables[0].schema],
            "rows": pa.concat_tables(tables).to_pylist(), "manifest": manifest,
            "metrics": metrics, "report": report}


def assert_same(got, want, where="output") -> None:
    if isinstance(want, float) or isinstance(got, float):
        assert math.isclose(got, want, abs_tol=1e-5), f"{where}: {got} != {want}"
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{where}: {len(got)} items != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_output_matches_the_run_before_the_restructuring(qwen_model, ray_cluster, tmp_path):
    out = tmp_path / "out"
    run_classify(golden_config(qwen_model, golden_corpus(tmp_path / "in"), out))
    assert_same(output_view(out), json.loads(GOLDEN.read_text()))


if __name__ == "__main__":
    import tempfile

    import ray

    from tiny_models import build_qwen2_classifier

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # The model the session fixture `qwen_model` builds.
        model = build_qwen2_classifier(root / "model", LABELS)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        run_classify(golden_config(model, golden_corpus(root / "in"), root / "out"))
        Path(sys.argv[1]).write_text(json.dumps(output_view(root / "out"), indent=1,
                                                sort_keys=True, default=str) + "\n")
