"""run_distill(cfg): an LLM's labels on a sample become a small classifier that labels the rest.

One straight line of steps, each leaving its output in the run folder and skipped when a
rerun finds it done, so a rerun resumes at the step it stopped in:

  sample/         a seeded random sample of the corpus, in files of sample.rows_per_shard
                  rows (the teacher's step resumes file by file)
  teacher/        the teacher's labels of the sample (a classify run)
  student-data/   the labelled sample split into train/ and heldout/ (seeded)
  student/        the student fine-tuned on the teacher's labels; student-model/ merged
  heldout/        the student's labels of the held-out rows; gate.json: agreement (and
                  accuracy with gold labels) against the gate — a miss stops here (exit 2)
  labelled/       with label_corpus: the corpus through a cascade, student then teacher,
                  the threshold picked on the held-out rows (a rerun whose gate picks
                  another threshold labels the corpus again)
  distill.json    the summary: every step's wall time, the gate, the cascade's savings
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter

import numpy as np
import pyarrow as pa

from clsjob import store
from clsjob.config import (CASCADE, CascadeBackendConfig, CascadeStageConfig, ClassifyConfig,
                           DistillConfig, FinetuneConfig, FinetuneOutputConfig, HFBackendConfig,
                           InputConfig, MergeConfig, OutputConfig, ResourcesConfig, config_hash,
                           validate)
from clsjob.contract import GOLD, MANIFEST
from clsjob.store import InputError

log = logging.getLogger("clsjob")
SUMMARY = "distill.json"
WORK = "_distill_work.json"  # what the run folder's finished steps were made from
# What may change between reruns of one run folder: the gate is judged again (a new
# threshold labels the corpus again), the corpus labelled or not, on any cluster and with any
# actor pools (the teacher's labels and the student do not depend on where they ran: a small
# node gives the teacher every core for the sample, then shares them in the cascade).
# Anything else would mix outputs of two configs.
RERUN_MAY_CHANGE = {"gate": True, "label_corpus": True, "cluster": True,
                    "teacher": {"resources"}, "student": {"resources"}}
TEACHER_LABEL = "teacher_label"
CORPUS_GOLD = "corpus_gold"  # the corpus's own gold labels, beside the teacher's, held out


class GateMissed(InputError):
    """The student did not reach the gate; the message says by how much."""


def run_distill(cfg: DistillConfig) -> dict:
    run = cfg.output.path
    claim_run_folder(cfg)
    steps: dict[str, float | str] = {}

    def step(name: str, done: bool, work) -> None:
        if done:
            steps[name] = "done before"
            log.info("distill: %s already done", name)
            return
        started = time.monotonic()
        work()
        steps[name] = round(time.monotonic() - started, 2)
        log.info("distill: %s done in %.1f s", name, steps[name])

    step("sample", finished(run, "sample", cfg), lambda: write_sample(cfg))
    check_gold_spelling(cfg)
    step("teacher", finished(run, "teacher", cfg), lambda: label_sample(cfg))
    step("split", finished(run, "student-data", cfg), lambda: split_sample(cfg))
    step("finetune", finished(run, "student", cfg, "clsjob_finetune.json"), lambda: train_student(cfg))
    step("merge", finished(run, "student-model", cfg, "config.json"), lambda: merge_student(cfg))
    step("gate", finished(run, "heldout", cfg), lambda: label_heldout(cfg))
    gate = judge_gate(cfg)
    store.write_json(gate, store.join(run, "gate.json"), cfg.storage)
    summary = {"steps_wall_s": steps, "gate": gate}
    if not gate["passed"]:
        store.write_json(summary, store.join(run, SUMMARY), cfg.storage)
        raise GateMissed(f"the student missed the gate: {gate['why']} (see {store.join(run, 'gate.json')}); "
                         f"a rerun with another gate resumes from here")
    if cfg.label_corpus:
        below, before = gate["cascade_below"], labelled_below(cfg)
        if before is not None and before != below:
            log.info("distill: the corpus was labelled with threshold %.4f, the gate now picks %.4f: "
                     "labelling it again", before, below)
        step("label_corpus", before == below,
             lambda: label_corpus(cfg, below, gate["cascade_escalated_share"], again=before is not None))
        summary["corpus"] = corpus_summary(cfg)
    store.write_json(summary, store.join(run, SUMMARY), cfg.storage)
    return summary


def claim_run_folder(cfg: DistillConfig) -> None:
    """Refuse to resume a run folder whose steps were made from another config (a changed
    sample, teacher or student would be silently skipped as done)."""
    url = store.join(cfg.output.path, WORK)
    work = config_hash(cfg, exclude=RERUN_MAY_CHANGE)
    if store.exists(url, cfg.storage):
        before = store.read_json(url, cfg.storage)
        if before["work_hash"] != work:
            changed = sorted(k for k, v in cfg.model_dump(mode="json", exclude=RERUN_MAY_CHANGE).items()
                             if before["config"].get(k) != v)
            raise InputError(f"output.path {cfg.output.path} holds a distill run of another config "
                             f"(changed: {', '.join(changed) or 'defaults'}); only gate, label_corpus, "
                             f"cluster and the teacher's and student's resources may change between "
                             f"reruns; use another output.path")
        return
    store.write_json({"work_hash": work, "config": cfg.model_dump(mode="json", exclude=RERUN_MAY_CHANGE)},
                     url, cfg.storage)


def finished(run: str, folder: str, cfg: DistillConfig, marker: str = MANIFEST) -> bool:
    """A step's output is complete: a classify run's manifest says so, or its last file exists."""
    url = store.join(run, folder, marker)
    if not store.exists(url, cfg.storage):
        return False
    return marker != MANIFEST or store.read_json(url, cfg.storage).get("status") == "complete"


def sample_indices(total: int, n: int, seed: int) -> np.ndarray:
    """`n` distinct row numbers of `total`, sorted: the same for the same seed."""
    return np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))


def write_sample(cfg: DistillConfig) -> None:
    """The sample, drawn over every shard's rows, as one Parquet file: id, text (and gold)."""
    shards = store.inspect_shards(store.list_shards(cfg.input.path, cfg.storage), cfg.storage)
    bad = [s.error for s in shards if s.error]
    if bad:
        raise InputError(bad[0])
    total = sum(s.rows for s in shards)
    n = cfg.sample.rows or math.ceil(cfg.sample.fraction * total)
    picked = sample_indices(total, n, cfg.sample.seed)
    columns = [c for c in (cfg.input.id_column, cfg.input.text_column, cfg.input.label_column) if c]
    tables, start = [], 0
    for shard in shards:
        mine = picked[(picked >= start) & (picked < start + shard.rows)] - start
        if len(mine):
            t = store.read_table(shard.path, cfg.storage, columns).take(pa.array(mine))
            ids = (t.column(cfg.input.id_column).cast(pa.string()) if cfg.input.id_column
                   else pa.array([f"{shard.key}:{i}" for i in mine.tolist()], pa.string()))
            out = {"id": ids, "text": t.column(cfg.input.text_column)}
            if cfg.input.label_column:
                out[GOLD] = t.column(cfg.input.label_column).cast(pa.string())
            tables.append(pa.table(out))
        start += shard.rows
    sample, size = pa.concat_tables(tables), cfg.sample.rows_per_shard
    # Several files, not one: the teacher's classify run resumes shard by shard.
    files = [f"sample-{i // size:05d}.parquet" for i in range(0, sample.num_rows, size)]
    for start, name in zip(range(0, sample.num_rows, size), files):
        store.write_part(sample.slice(start, size), store.join(cfg.output.path, "sample", name), cfg.storage)
    store.write_json({"status": "complete", "rows": int(len(picked)), "of": total, "files": files},
                     store.join(cfg.output.path, "sample", MANIFEST), cfg.storage)


def classify_config(cfg: DistillConfig, step: str, inp: InputConfig, out: str, backend,
                    resources: ResourcesConfig | None = None, overwrite: bool = False) -> ClassifyConfig:
    """A classify run of one step, from the distill config's own typed sections; checked as a
    loaded config is, so a mistake names the step and the key. A cascade has no `resources`:
    each stage has its own."""
    sections = {"input": inp, "labels": cfg.labels or None, "backend": backend,
                "output": OutputConfig(path=out, overwrite=overwrite), "storage": cfg.storage,
                "cluster": cfg.cluster}
    if resources is not None:
        sections["resources"] = resources
    return validate(sections, model=ClassifyConfig, source=f"distill {step}")


def sample_input(folder: str, label_column: str | None, carry: list[str] = ()) -> InputConfig:
    """The sample's files as classify input: written by this run, so id and text are known."""
    return InputConfig(path=folder, id_column="id", text_column="text", label_column=label_column,
                       carry_columns=list(carry))


def label_sample(cfg: DistillConfig) -> None:
    from clsjob.run.pipeline import run_classify

    gold = GOLD if cfg.input.label_column else None
    run_classify(classify_config(cfg, "teacher", sample_input(store.join(cfg.output.path, "sample"), gold),
                                 store.join(cfg.output.path, "teacher"), cfg.teacher.backend,
                                 cfg.teacher.resources))


def read_run(url: str, cfg: DistillConfig) -> pa.Table:
    """A classify run's rows, from the parts its manifest lists."""
    manifest = store.read_json(store.join(url, MANIFEST), cfg.storage)
    return pa.concat_tables(store.read_table(store.join(url, p["part"]), cfg.storage)
                            for p in manifest["parts"])


def split_sample(cfg: DistillConfig) -> None:
    """The teacher's labelled rows, split (seeded) into train and heldout; train keeps only
    rows the teacher was sure enough of, with student.min_teacher_confidence."""
    labelled = read_run(store.join(cfg.output.path, "teacher"), cfg)
    labelled = labelled.filter(pa.compute.is_valid(labelled.column("label")))
    keep = ["id", "text", "label", "confidence"] + ([GOLD] if GOLD in labelled.column_names else [])
    names = {"label": TEACHER_LABEL, GOLD: CORPUS_GOLD}
    labelled = labelled.select(keep).rename_columns([names.get(c, c) for c in keep])
    order = np.random.default_rng(cfg.sample.seed).permutation(labelled.num_rows)
    cut = max(1, round(cfg.sample.heldout_fraction * labelled.num_rows))
    heldout, train = labelled.take(pa.array(order[:cut])), labelled.take(pa.array(order[cut:]))
    if cfg.student.min_teacher_confidence is not None:
        train = train.filter(pa.compute.greater_equal(train.column("confidence"),
                                                      cfg.student.min_teacher_confidence))
    if not train.num_rows:
        raise InputError("no sample row is left to train the student on (sample too small, or "
                         "student.min_teacher_confidence too high)")
    data = store.join(cfg.output.path, "student-data")
    store.write_part(train, store.join(data, "train", "part-0.parquet"), cfg.storage)
    store.write_part(heldout, store.join(data, "heldout", "part-0.parquet"), cfg.storage)
    store.write_json({"status": "complete", "train_rows": train.num_rows, "heldout_rows": heldout.num_rows},
                     store.join(data, MANIFEST), cfg.storage)


def train_student(cfg: DistillConfig) -> None:
    from clsjob.finetune.train import run_finetune

    data = store.join(cfg.output.path, "student-data")
    teacher = store.read_json(store.join(cfg.output.path, "teacher", MANIFEST), cfg.storage)
    run_finetune(validate({
        "base_model": cfg.student.base_model,
        "train": InputConfig(path=store.join(data, "train"), label_column=TEACHER_LABEL),
        "eval": InputConfig(path=store.join(data, "heldout"), label_column=TEACHER_LABEL),
        "labels": teacher["labels"],  # the teacher's label order: the cascade needs both alike
        "training": cfg.student.training,
        "output": FinetuneOutputConfig(path=store.join(cfg.output.path, "student")),
        "storage": cfg.storage, "cluster": cfg.cluster}, model=FinetuneConfig, source="distill finetune"))


def merge_student(cfg: DistillConfig) -> None:
    from clsjob.finetune.merge import merge

    merge(MergeConfig(adapter=store.join(cfg.output.path, "student"),
                      output=store.join(cfg.output.path, "student-model"), dtype="float32",
                      storage=cfg.storage))


def student_backend(cfg: DistillConfig) -> HFBackendConfig:
    return HFBackendConfig(model=store.join(cfg.output.path, "student-model"),
                           max_length=cfg.student.training.max_length)


def label_heldout(cfg: DistillConfig) -> None:
    from clsjob.run.pipeline import run_classify

    # Scored against the teacher's labels; the corpus's own gold rides along where it has one.
    carry = [CORPUS_GOLD] if cfg.input.label_column else []
    heldout = sample_input(store.join(cfg.output.path, "student-data", "heldout"), TEACHER_LABEL, carry)
    run_classify(classify_config(cfg, "gate", heldout, store.join(cfg.output.path, "heldout"),
                                 student_backend(cfg), cfg.student.resources))


def cascade_threshold(confidence: np.ndarray, agree: np.ndarray, target: float) -> tuple[float, float, float]:
    """The lowest threshold t whose cascade (the student's label where its confidence is at
    least t, the teacher's under it) agrees with the teacher on `target` of these rows: fewest
    rows escalated. Returns (t, share escalated, agreement)."""
    order = np.argsort(confidence, kind="stable")
    conf, hits = confidence[order], agree[order].astype(float)
    n = len(conf)
    # Candidates: each distinct confidence (rows under it escalate, ties stay) and one above all.
    candidates = np.r_[np.unique(conf), np.nextafter(conf[-1], 2.0)]
    escalated = np.searchsorted(conf, candidates, side="left")
    kept_agreeing = np.r_[np.cumsum(hits[::-1])[::-1], 0.0][escalated]
    agreement = (escalated + kept_agreeing) / n  # escalated rows agree by construction
    k = int(np.flatnonzero(agreement >= target - 1e-12)[0])
    return float(candidates[k]), float(escalated[k] / n), float(agreement[k])


def judge_gate(cfg: DistillConfig) -> dict:
    """The student against the gate on the held-out rows, and the cascade threshold."""
    rows = read_run(store.join(cfg.output.path, "heldout"), cfg)
    label = np.array(rows.column("label").to_pylist(), dtype=object)
    teacher = np.array(rows.column(GOLD).to_pylist(), dtype=object)  # the teacher's label, as gold
    agree = label == teacher
    gate = cfg.gate
    out = {"heldout_rows": rows.num_rows, "agreement": float(agree.mean()),
           "min_agreement": gate.min_agreement}
    misses = []
    if out["agreement"] < gate.min_agreement:
        misses.append(f"agreement {out['agreement']:.4f} < {gate.min_agreement} "
                      f"(short by {gate.min_agreement - out['agreement']:.4f})")
    if CORPUS_GOLD in rows.column_names:  # the corpus's gold labels, carried
        gold = np.array(rows.column(CORPUS_GOLD).to_pylist(), dtype=object)
        # Scored only where the gold is spelled as a label of the teacher's (an LLM's labels
        # are the strings its config names, the corpus may spell them otherwise): never a
        # silent 0 accuracy.
        names = read_labels(cfg)
        known = np.array([g in names for g in gold], dtype=bool)
        outside = Counter(g for g in gold if g is not None and g not in names)
        if outside:
            out["gold_outside_labels"] = dict(outside.most_common(5))
        out["accuracy"] = float((label[known] == gold[known]).mean()) if known.any() else None
        out["teacher_accuracy"] = float((teacher[known] == gold[known]).mean()) if known.any() else None
        if gate.min_accuracy is not None and out["accuracy"] is None:
            misses.append(f"accuracy cannot be judged: no held-out row's gold label "
                          f"({cfg.input.label_column}) is one of the teacher's labels {names} "
                          f"(the corpus has {sorted(outside)[:5]})")
        elif gate.min_accuracy is not None and out["accuracy"] < gate.min_accuracy:
            misses.append(f"accuracy {out['accuracy']:.4f} < {gate.min_accuracy}")
    confidence = np.nan_to_num(np.array(rows.column("confidence").to_pylist(), dtype=float), nan=0.0)
    below, share, agreement = cascade_threshold(confidence, agree, gate.cascade_agreement)
    out |= {"passed": not misses, "why": "; ".join(misses) or None, "cascade_below": below,
            "cascade_escalated_share": share, "cascade_agreement": agreement}
    return out


def read_labels(cfg: DistillConfig) -> list[str]:
    """The teacher's label names, in its order (its classify run's manifest)."""
    return store.read_json(store.join(cfg.output.path, "teacher", MANIFEST), cfg.storage)["labels"]


def check_gold_spelling(cfg: DistillConfig) -> None:
    """Before the teacher runs: the sample's gold labels against the labels the teacher is
    told (`labels`). None of them a label: refused, naming both spellings (accuracy against
    gold would be 0); some: said in the log, those rows are left out of the accuracy."""
    if not (cfg.labels and cfg.input.label_column):
        return
    names = [spec.name for spec in cfg.labels]
    gold = Counter(v for v in read_sample(cfg, [GOLD]).column(GOLD).to_pylist() if v is not None)
    outside = {g: n for g, n in gold.items() if g not in names}
    if gold and len(outside) == len(gold):
        raise InputError(f"input.label_column {cfg.input.label_column}: none of the sample's gold "
                         f"labels {sorted(gold)[:5]} is one of labels {names}; spell the labels "
                         f"as the corpus does, or leave input.label_column out")
    if outside:
        log.warning("distill: %d sample rows have a gold label outside labels %s (%s); they are "
                    "left out of the accuracy", sum(outside.values()), names, sorted(outside)[:5])


def read_sample(cfg: DistillConfig, columns: list[str]) -> pa.Table:
    folder = store.join(cfg.output.path, "sample")
    files = store.read_json(store.join(folder, MANIFEST), cfg.storage)["files"]
    return pa.concat_tables(store.read_table(store.join(folder, f), cfg.storage, columns) for f in files)


def labelled_below(cfg: DistillConfig) -> float | None:
    """The threshold of the finished corpus labelling in the run folder; None if there is none
    (an unfinished one resumes shard by shard)."""
    url = store.join(cfg.output.path, "labelled", MANIFEST)
    if not finished(cfg.output.path, "labelled", cfg):
        return None
    return store.read_json(url, cfg.storage)[CASCADE]["stages"][0]["escalate_below"]


def label_corpus(cfg: DistillConfig, below: float, share: float, again: bool = False) -> None:
    """The corpus through the cascade; `again`: replacing a finished labelling made with
    another threshold. `share`: the held-out rows' share escalated, which with each model's
    measured cost sizes unsized stages on a CPU node."""
    from clsjob.run.pipeline import run_classify

    run_classify(classify_config(cfg, "label_corpus", cfg.input, store.join(cfg.output.path, "labelled"),
                                 corpus_cascade(cfg, below), overwrite=again),
                 stage_work=stage_work(cfg, share))


def stage_work(cfg: DistillConfig, share: float) -> list[float] | None:
    """The CPU seconds a corpus row is expected to bring each stage: the student's a row on
    the held-out rows (it sees every row), the teacher's on the sample times the share
    escalated — a teacher a hundred times the student's cost does nearly all the work, and an
    even split of a CPU node would leave it half the cores. CPU seconds, not seconds: the
    teacher's sample often ran on many more CPUs than the student's held-out rows. None when
    a step did not measure it."""
    costs = []
    for folder in ("heldout", "teacher"):
        manifest = store.read_json(store.join(cfg.output.path, folder, MANIFEST), cfg.storage)
        busy = manifest.get("busy") or {}
        if not busy.get("model_s") or not manifest.get("rows_out"):
            return None
        # A step's manifest from before cpus_per_actor was recorded: plain seconds, as then.
        costs.append(busy["model_s"] * (busy.get("cpus_per_actor") or 1) / manifest["rows_out"])
    return [costs[0], costs[1] * share]


def corpus_cascade(cfg: DistillConfig, below: float) -> CascadeBackendConfig:
    """Student, then teacher under `below`. A stage whose resources the user left unset stays
    unset, so the classify run sizes it for a CPU node (placement.size_cpu_stages)."""
    def given(section) -> dict:
        return {"resources": section.resources} if "resources" in section.model_fields_set else {}

    return CascadeBackendConfig(stages=[
        CascadeStageConfig(name="student", backend=student_backend(cfg), escalate_below=below,
                           **given(cfg.student)),
        CascadeStageConfig(name="teacher", backend=cfg.teacher.backend, **given(cfg.teacher))])


def corpus_summary(cfg: DistillConfig) -> dict:
    """Rows the teacher labelled, and the labelling time saved against the teacher alone,
    estimated from each stage's busy seconds (the teacher alone: its seconds per row on the
    rows it ran, times every row)."""
    manifest = store.read_json(store.join(cfg.output.path, "labelled", MANIFEST), cfg.storage)
    stages = {stage["name"]: stage for stage in manifest[CASCADE]["stages"]}
    student, teacher = stages["student"], stages["teacher"]
    rows = student["rows_ran"]
    alone = teacher["busy_s"] / teacher["rows_ran"] * rows if teacher["rows_ran"] else None
    spent = student["busy_s"] + teacher["busy_s"]
    return {"rows": rows, "teacher_rows": teacher["rows_labelled"],
            "teacher_share": teacher["rows_labelled"] / rows if rows else None,
            "busy_s": round(spent, 2), "teacher_alone_busy_s_estimate": round(alone, 2) if alone else None,
            "time_saved_estimate": round(1 - spent / alone, 4) if alone else None}
