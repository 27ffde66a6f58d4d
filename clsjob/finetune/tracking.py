"""Experiment tracking for a fine-tune, off unless `training.report_to` names a tracker.

The HF Trainer's own integrations log the training arguments and every epoch's metrics; clsjob
opens the run itself first (so the integration logs into it and leaves it open), adds the whole
clsjob config, and after the final evaluation the calibration, then closes it. Only rank 0
logs. Whatever a tracker writes to files (TensorBoard events, an MLflow file store, an offline
W&B run) goes to the worker's scratch folder and travels with the final model into
`<output.path>/tracking/`, so it lands wherever the model does (local or s3://)."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

from transformers import TrainerCallback

from clsjob.config import TrackingConfig

log = logging.getLogger("clsjob")
TRACKING = "tracking"
# The Python package each tracker needs, as `report_to` names it.
PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboardX", "wandb": "wandb"}


def check_installed(report_to: list[str]) -> None:
    """Fail on the driver, before any GPU is held, when a named tracker cannot be imported."""
    missing = [name for name in report_to if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise ModuleNotFoundError(
            f"training.report_to names {missing}, but {[PACKAGES[n] for n in missing]} is not "
            "installed: pip install 'clsjob[tracking]' (on every node that trains)")


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}`: trackers take flat string parameters."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return flat


class Tracker:
    """One fine-tune's tracked run on one worker: `callbacks()` for the HF Trainer, `finish()`
    with the final metrics, `close()` always (a run left open on failure is marked failed).
    A worker other than rank 0, or an empty `report_to`, tracks nothing."""

    def __init__(self, report_to: list[str], settings: TrackingConfig, folder: Path,
                 run_name: str, rank: int):
        self.tools = list(report_to) if rank == 0 else []
        self.settings, self.folder, self.run_name = settings, folder, run_name
        self.finished = False

    def callbacks(self, config: dict) -> list[TrainerCallback]:
        """Open each tracker's run, log the clsjob config into it, and return the HF
        integration callbacks that log each epoch into the same run."""
        from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

        made = []
        if "mlflow" in self.tools:
            self._start_mlflow(config)
            made.append(MLflowCallback())
        if "tensorboard" in self.tools:
            writer = self._tensorboard_writer()
            writer.add_text("clsjob_config", "```\n" + json.dumps(config, indent=1) + "\n```")
            made.append(TensorBoardCallback(tb_writer=writer))  # it closes the writer at the end
        if "wandb" in self.tools:
            import wandb

            wandb.init(project=self.settings.experiment, name=self.run_name,
                       dir=str(self._folder("wandb")), mode=self.settings.wandb_mode,
                       config={"clsjob": config})
            made.append(WandbCallback())
        return made

    def _folder(self, name: str) -> Path:
        path = self.folder / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _tensorboard_writer(self):
        from tensorboardX import SummaryWriter

        return SummaryWriter(logdir=str(self._folder("tensorboard")))

    def _start_mlflow(self, config: dict) -> None:
        import mlflow

        uri = (self.settings.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
               or self._folder("mlruns").absolute().as_uri())
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless asked (it is in maintenance mode); it is
            # still the one store that needs no server or database.
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(self.settings.experiment)
        mlflow.start_run(run_name=self.run_name)
        params = flatten(config, prefix="clsjob.")
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
            mlflow.log_params(dict(items[i:i + 100]))
        log.info("finetune: tracking in MLflow at %s, experiment %r, run %s", uri,
                 self.settings.experiment, mlflow.active_run().info.run_id)

    def finish(self, metrics: dict[str, float], step: int) -> None:
        """Log the final metrics (evaluation, calibration) at `step` and close every run."""
        if "mlflow" in self.tools:
            import mlflow

            mlflow.log_metrics(metrics, step=step)
        if "tensorboard" in self.tools:
            writer = self._tensorboard_writer()
            for name, value in metrics.items():
                writer.add_scalar(name, value, step)
            writer.close()
        if "wandb" in self.tools:
            import wandb

            # Stepped as the HF integration steps its own logs (it defines the step metric).
            wandb.log({**metrics, "train/global_step": step})
        self.finished = True
        self.close()

    def close(self) -> None:
        if "mlflow" in self.tools:
            import mlflow

            if mlflow.active_run():
                mlflow.end_run(status="FINISHED" if self.finished else "FAILED")
        if "wandb" in self.tools:
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=0 if self.finished else 1)

    def copy_into(self, model_folder: Path) -> None:
        """The trackers' files, next to the final model they describe."""
        if self.tools and self.folder.is_dir():
            shutil.copytree(self.folder, model_folder / TRACKING, dirs_exist_ok=True)


def final_metrics(final_eval: dict, calibration: dict | None) -> dict[str, float]:
    """What the end of a fine-tune adds to its tracked run: the final model's eval metrics and
    its calibration (temperature, ECE and NLL before and after, abstention threshold)."""
    metrics = {f"final/{k}": float(v) for k, v in final_eval.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if calibration:
        for key in ("temperature", "ece_before", "ece_after", "nll_before", "nll_after"):
            metrics[f"calibration/{key}"] = float(calibration[key])
        if calibration.get("abstain"):
            metrics["calibration/abstain_below"] = float(calibration["abstain"]["below"])
    return metrics
