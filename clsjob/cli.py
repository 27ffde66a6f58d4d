"""`clsjob classify | finetune | merge | distill | evaluate | calibrate | import-model | demo` — each parses a config and calls one
straight-line run function; errors a user can fix print one clear message and exit 2."""
from __future__ import annotations

import argparse
import json
from datetime import date
import logging
import sys

from clsjob.backends import ModelError
from clsjob.config import (ClassifyConfig, ConfigError, DistillConfig, FinetuneConfig, MergeConfig,
                           StorageConfig, field_reference, load_config)
from clsjob.evaluation.monitor import DriftAlert
from clsjob.import_model import GGUFError
from clsjob.labels import LabelError
from clsjob.run.lock import RunLocked
from clsjob.run.placement import PlacementError
from clsjob.run.resume import OutputConflict
from clsjob.store import InputError

log = logging.getLogger("clsjob")
DRIFT_EXIT = 3  # jobs/nightly.sh does not retry it
CONFIGS = {"classify": ClassifyConfig, "finetune": FinetuneConfig, "merge": MergeConfig,
           "distill": DistillConfig}
# Errors whose message tells the user what to fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, InputError, LabelError, ModelError, OutputConflict, RunLocked,
               PlacementError, GGUFError, FileNotFoundError, FileExistsError)


def _config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY.PATH=VALUE", help="override one config value (repeatable)")
    parser.add_argument("--date", type=date.fromisoformat, metavar="YYYY-MM-DD",
                        help="fills {date} and {date:<strftime>} templates in the config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clsjob", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    classify = sub.add_parser("classify", help="label Parquet shards (resumes unfinished work)")
    _config_args(classify)
    classify.add_argument("--overwrite", action="store_true",
                          help="redo a finished or partial run from scratch")
    _config_args(sub.add_parser("finetune", help="train a LoRA (or full) classifier with Ray Train"))
    _config_args(sub.add_parser("merge", help="merge an adapter into a model folder"), required=False)
    _config_args(sub.add_parser("distill", help="teacher labels a sample -> student fine-tuned -> "
                                                "gate -> corpus through a student/teacher cascade"))
    ev = sub.add_parser("evaluate", help="recompute _metrics.json and report.md of an output")
    ev.add_argument("--output", required=True, help="output folder of a classify run")
    ev.add_argument("--endpoint-url", help="S3-compatible endpoint, if the output is on one")
    ev.add_argument("--target-accuracy", type=float,
                    help="name the lowest confidence threshold whose rows reach this accuracy")
    cal = sub.add_parser("calibrate", help="fit a confidence temperature on a labelled output "
                                           "(for backend.prompt.temperature_scale)")
    cal.add_argument("--output", required=True, help="output folder of a labelled classify run")
    cal.add_argument("--endpoint-url", help="S3-compatible endpoint, if the output is on one")
    imp = sub.add_parser("import-model", help="a GGUF file -> a transformers model folder "
                                              "(safetensors, tokenizer, chat template)")
    imp.add_argument("gguf", help="the .gguf file (llama.cpp, Ollama)")
    imp.add_argument("--output", required=True, help="the model folder to write (must not exist)")
    imp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="weights of the folder: float32 keeps the dequantised weights exactly; "
                          "bfloat16 halves the folder")
    ref = sub.add_parser("config", help="every setting of a command's config, its default and meaning")
    ref.add_argument("kind", choices=sorted(CONFIGS))
    demo = sub.add_parser("demo", help="corpus -> fine-tune MiniLM -> merge -> classify, locally")
    demo.add_argument("--workdir", default="demo-output")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Dispatch one command; returns what is printed as its JSON summary."""
    if args.command == "classify":
        from clsjob.run.pipeline import run_classify
        overrides = args.overrides + (["output.overwrite=true"] if args.overwrite else [])
        cfg = load_config(args.config, overrides, model=ClassifyConfig, day=args.date)
        return run_classify(cfg).__dict__
    if args.command == "finetune":
        from clsjob.finetune.train import run_finetune
        summary = run_finetune(load_config(args.config, args.overrides, model=FinetuneConfig,
                                           day=args.date))
        return {k: summary.get(k) for k in ("train_rows", "eval_rows", "final_eval", "calibration",
                                            "wall_time_s", "train_tokens_per_s")}
    if args.command == "merge":
        from clsjob.finetune.merge import merge
        cfg = load_config(args.config, args.overrides, model=MergeConfig, day=args.date)
        return {"model": str(merge(cfg))}
    if args.command == "distill":
        from clsjob.distill import run_distill
        return run_distill(load_config(args.config, args.overrides, model=DistillConfig, day=args.date))
    if args.command == "evaluate":
        from clsjob.evaluation.report import evaluate_output
        metrics = evaluate_output(args.output, StorageConfig(endpoint_url=args.endpoint_url),
                                  args.target_accuracy)
        from clsjob.task import Task
        headline = Task.of_metrics(metrics).headline
        return {k: metrics[k] for k in ("rows", "rows_scored", *headline)}
    if args.command == "calibrate":
        from clsjob.evaluation.report import calibrate_output
        return calibrate_output(args.output, StorageConfig(endpoint_url=args.endpoint_url))
    if args.command == "import-model":
        from clsjob.import_model import import_gguf
        return import_gguf(args.gguf, args.output, args.dtype)
    if args.command == "demo":
        from clsjob.demo import run_demo
        return run_demo(args.workdir)
    raise AssertionError(args.command)


def config_table(model) -> str:
    rows = field_reference(model)
    width = max(len(key) for key, _, _ in rows)
    return "\n".join(f"{key:<{width}}  {default:<10}  {text}".rstrip() for key, default, text in rows)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "config":
        print(config_table(CONFIGS[args.kind]))
        return 0
    try:
        result = run(args)
    except USER_ERRORS as exc:
        print(f"clsjob {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except DriftAlert as exc:  # its own code: the run is complete, a scheduler should alert
        print(f"clsjob {args.command}: drift: {exc}", file=sys.stderr)
        return DRIFT_EXIT
    print(json.dumps(result, indent=2, default=str))
    if args.command == "demo" and not result["passed"]:
        print(f"clsjob demo: error: accuracy {result['accuracy']:.3f} is below the demo's floor "
              f"of {result['accuracy_floor']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
