"""What a fine-tune says while it runs, through the clsjob logger and from rank 0 only: a
line at most every `every_s` seconds between epochs (step of total, loss, tokens/s, time
left), and one line per epoch's logged metrics. The HF Trainer's own printer is replaced: Ray
Train forwards a worker's prints twice (stdout and its log), and it says nothing mid-epoch."""
from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

log = logging.getLogger("clsjob")


class RunningTotals:
    """Loss and non-padding tokens since the last progress line, added by the trainer after
    every micro-batch. The loss stays a tensor until it is printed: reading it each step
    would wait for the GPU."""

    def __init__(self):
        self.loss, self.tokens = 0.0, 0

    def add(self, loss, tokens: int) -> None:
        self.loss = self.loss + loss.detach()
        self.tokens += tokens

    def take(self) -> tuple[float, int]:
        loss, tokens = float(self.loss), self.tokens
        self.loss, self.tokens = 0.0, 0
        return loss, tokens


class ProgressLog(TrainerCallback):
    def __init__(self, running: RunningTotals, every_s: float = 30.0):
        self.running, self.every_s = running, every_s
        self.started = self.last = time.monotonic()
        self.first_step = self.last_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last = time.monotonic()
        # A resumed run starts past zero: rates count only this run's steps.
        self.first_step = self.last_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if not state.is_world_process_zero or now - self.last < self.every_s:
            return
        loss, tokens = self.running.take()
        steps = state.global_step - self.last_step
        rate = (state.global_step - self.first_step) / max(now - self.started, 1e-9)
        left = (state.max_steps - state.global_step) / rate if rate else float("inf")
        # The trainer's loss per micro-batch is already divided by the accumulation steps, so
        # the sum per optimizer step is the step's loss, as the Trainer logs it.
        log.info("finetune: step %d/%d (%.0f%%), epoch %.2f, loss %.4f, %.0f tokens/s per "
                 "worker, ~%.0f s left", state.global_step, state.max_steps,
                 100 * state.global_step / max(state.max_steps, 1), state.epoch,
                 loss / max(steps, 1), tokens / (now - self.last), left)
        self.last, self.last_step = now, state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in logs.items() if k != "epoch")  # said in front
            log.info("finetune: epoch %.2f: %s", state.epoch or 0.0, shown)
