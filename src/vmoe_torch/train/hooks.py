"""Periodic work around the training loop, as hooks (the reference trainer's
pattern): the loop runs steps; logging, progress, evaluation, signals and
checkpoints each live in one hook.

A hook sees the trainer and, after every step, `done` (steps completed) and
the step's record (losses and routing metrics on logged steps, else just
the step). Hooks run in order; a hook may ask the loop to stop
(`trainer.request_stop`), and the checkpoint hook, which runs last, then
saves the step.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any, Optional, Protocol

from torch import nn

from ..config.experiment import ExperimentConfig
from ..distributed.runtime import agent_gone
from ..storage.workdir import latest_checkpoint
from ..utils.errors import RunRefused, mark_agreed
from .logger import MetricsLogger
from .parallel import ParallelMode


class TrainerView(Protocol):
    """What hooks see of the trainer (`vmoe_torch.train.trainer.Trainer`)."""

    cfg: ExperimentConfig
    workdir: str
    mode: ParallelMode
    stop_reason: Optional[str]

    @property
    def model(self) -> nn.Module: ...

    def evaluate(self) -> dict[str, float]: ...

    def request_stop(self, reason: str, signum: Optional[int] = None) -> None: ...

    def save(self, step: int) -> str: ...

    def finite(self, weights: bool = False) -> bool: ...


class DivergedError(RunRefused):
    """The loss, the gradient norm or the weights stopped being finite."""


class Hook:
    """No-op base: override what you need."""

    def start(self, trainer: TrainerView, start: int) -> None:
        """Before the first step (`start` is the step resumed from)."""

    def after_step(self, trainer: TrainerView, done: int, record: dict[str, Any]) -> None:
        """After step `done` - 1 has updated the weights."""

    def end(self, trainer: TrainerView) -> None:
        """After the loop, also when it raised."""


class LogMetrics(Hook):
    """metrics.jsonl (and TensorBoard) on logged steps, with throughput."""

    def __init__(self) -> None:
        self.logger: Optional[MetricsLogger] = None
        self.t_last, self.images = 0.0, 0

    def start(self, trainer: TrainerView, start: int) -> None:
        if trainer.mode.lead:
            self.logger = MetricsLogger(trainer.workdir, resume_step=start)
        self.t_last, self.images = time.perf_counter(), 0

    def after_step(self, trainer: TrainerView, done: int, record: dict[str, Any]) -> None:
        self.images += trainer.cfg.data.batch_size
        if "loss" not in record:
            return
        now = time.perf_counter()
        record["images_per_s"] = self.images / max(now - self.t_last, 1e-9)
        self.t_last, self.images = now, 0
        if self.logger is not None:
            self.logger.log(record)

    def log(self, record: dict[str, Any]) -> None:
        if self.logger is not None:
            self.logger.log(record)

    def end(self, trainer: TrainerView) -> None:
        if self.logger is not None:
            self.logger.close()


class Progress(Hook):
    """A tqdm bar on the lead rank (train.progress)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def start(self, trainer: TrainerView, start: int) -> None:
        if trainer.cfg.train.progress and trainer.mode.lead:
            from tqdm.auto import tqdm  # imported when used: tqdm.auto probes for notebooks
            self.bar = tqdm(total=trainer.cfg.train.steps, initial=start,
                            desc=os.path.basename(trainer.workdir.rstrip("/")), dynamic_ncols=True)

    def after_step(self, trainer: TrainerView, done: int, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['images_per_s']:.0f}")
        self.bar.update(1)

    def end(self, trainer: TrainerView) -> None:
        if self.bar is not None:
            self.bar.close()


class Evaluate(Hook):
    """Test accuracy every train.eval_every steps (one process; the final
    evaluation runs after the loop)."""

    def __init__(self, log: LogMetrics) -> None:
        self.log = log

    def after_step(self, trainer: TrainerView, done: int, record: dict[str, Any]) -> None:
        every = trainer.cfg.train.eval_every
        if not every or done % every or done == trainer.cfg.train.steps or trainer.mode.world > 1:
            return
        self.log.log({"step": done, **{f"eval/{k}": v for k, v in trainer.evaluate().items()}})
        trainer.model.train()


class StopOnSignal(Hook):
    """SIGTERM / SIGINT stop the run after the current step, on every rank
    (the ranks agree), and the step is checkpointed. Under torchrun, a
    worker whose agent died (torchrun SIGKILLed) stops the same way."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self.previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.signal = signum

    def start(self, trainer: TrainerView, start: int) -> None:
        self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def after_step(self, trainer: TrainerView, done: int, record: dict[str, Any]) -> None:
        orphaned = self.signal is None and agent_gone()
        if orphaned:  # torchrun's agent was killed: its workers would otherwise train on unsupervised
            self.signal = signal.SIGTERM
        self.signal = trainer.mode.agree_max(self.signal or 0) or None
        if self.signal is not None:
            reason = (f"stopped after step {done}: the torchrun agent is gone" if orphaned
                      else f"stopped by signal {self.signal} after step {done}")
            trainer.request_stop(reason, self.signal)

    def end(self, trainer: TrainerView) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def checkpoint_due(trainer: TrainerView, done: int) -> bool:
    every, total = trainer.cfg.train.checkpoint_every, trainer.cfg.train.steps
    return trainer.stop_reason is not None or done % every == 0 or done == total


class StopOnDivergence(Hook):
    """A non-finite loss or gradient norm, or non-finite weights, stop the
    run with an error naming the step, before anything non-finite is
    checkpointed. Checked on logged steps and before every checkpoint (one
    host read there, agreed by every rank), so the last checkpoint is always
    finite."""

    def after_step(self, trainer: TrainerView, done: int, record: dict[str, Any]) -> None:
        saving = checkpoint_due(trainer, done)
        if "loss" not in record and not saving:
            return
        if not trainer.mode.agree_max(0 if trainer.finite(weights=saving) else 1):
            return
        last = latest_checkpoint(trainer.workdir)
        values = f" (loss {record['loss']}, gradient norm {record['grad_norm']})" if "loss" in record else ""
        raise mark_agreed(DivergedError(
            f"Training diverged at step {done}: the loss, the gradient norm or the weights are no longer "
            f"finite{values}. Nothing of it was saved; the last checkpoint is "
            f"{last or 'none yet'}. Lower optim.lr, lengthen schedule.warmup_steps or set "
            "optim.grad_clip_norm, then start over (--force) or resume from that checkpoint."))


class Checkpoint(Hook):
    """A checkpoint every train.checkpoint_every steps, at the last step, and
    at a requested stop."""

    def after_step(self, trainer: TrainerView, done: int, record: dict[str, Any]) -> None:
        if checkpoint_due(trainer, done):
            trainer.save(done)


def default_hooks() -> list[Hook]:
    log = LogMetrics()
    return [log, Progress(), Evaluate(log), StopOnSignal(), StopOnDivergence(), Checkpoint()]
