"""The training loop: pre-training and fine-tuning from one typed config.

Determinism: the batch of step s and every random draw inside step s
(augmentation, mixup, router noise, dropout) are functions of (seed, s)
alone, so a run resumed from a checkpoint reproduces the per-step losses
of an uninterrupted run (CPU, fixed threads).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F
import yaml

from ..config.experiment import ExperimentConfig, config_to_dict
from ..data.pipeline import build_datasets, eval_batches, step_batches, to_model_range
from ..distributed.runtime import init_from_env, local_device
from ..evaluate.classification import evaluate_at_capacity
from ..models.loading import consolidate_checkpoint, load_model
from ..models.vit_moe import VisionTransformerMoe
from ..moe.metrics_switch import routing_metrics
from ..storage.lock import WorkdirLock, remove_orphan_temporaries
from ..storage.pretrained import config_json
from ..storage.workdir import (
    check_writable,
    damaged_checkpoints,
    last_logged_step,
    latest_checkpoint,
    list_checkpoints,
)
from ..utils.errors import RunRefused
from ..utils.io import atomic_write_json, atomic_write_text
from ..utils.ranks import warn_once
from ..utils.seeds import derive_seed
from .checkpoint import restore_latest
from .hooks import Hook, default_hooks
from .losses import LOSSES
from .optim import build_optimizer, learning_rate
from .parallel import ParallelMode, choose_mode

__all__ = ["Trainer", "build_model", "load_model", "run_identity", "step_seed"]

# Config parts that define a run; changing any of them in a work dir that
# holds a checkpoint needs --force. (train.steps may grow: that extends a run.)
_IDENTITY = ("model", "data", "optim", "schedule", "finetune")
_IDENTITY_TRAIN = ("loss", "grad_accum", "bf16", "seed")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available; use 'cpu' or 'auto'.")
    return device


def step_seed(seed: int, step: int) -> int:
    return derive_seed(seed, step) * 7 + 3


def run_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    d = config_to_dict(cfg)
    ident = {k: d[k] for k in _IDENTITY}
    ident["train"] = {k: d["train"][k] for k in _IDENTITY_TRAIN}
    return ident


def build_model(cfg: ExperimentConfig, num_classes: int) -> VisionTransformerMoe:
    """A fresh model, or the fine-tuning initialisation when finetune.init is set."""
    size = cfg.data.image_size
    if cfg.finetune.init is None:
        return VisionTransformerMoe(cfg.model.resolve(image_size=size, num_classes=num_classes))
    routing, head_bias = cfg.model.finetune_changes()
    model = load_model(cfg.finetune.init).train()
    if tuple(model.config.image_size) != (size, size):
        model.resize_pos_embed((size, size))
        if model.group_size is not None and "group_size" not in routing:
            warn_once(f"Fine-tuning at {size}x{size}: routing groups stay group_size={model.group_size} "
                          f"tokens ({model.group_size / model.config.tokens_per_image:.3g} images at this "
                          "resolution); set model.moe.group_size to choose another.")
    if cfg.finetune.new_head:
        model.reset_classifier(num_classes, head_bias_init=head_bias or 0.0,
                               keep_representation=cfg.finetune.keep_representation)
    elif model.config.num_classes != num_classes:
        raise ValueError(f"The initial model has {model.config.num_classes} classes, the data "
                         f"{num_classes}; set finetune.new_head=true.")
    if routing:
        model.set_routing(**routing)
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in cfg.finetune.freeze):
            p.requires_grad_(False)
    return model


class Trainer:
    """`Trainer(cfg, workdir).fit()` trains, checkpoints, resumes and logs."""

    def __init__(self, cfg: ExperimentConfig, workdir: str, force: bool = False,
                 hooks: Optional[list[Hook]] = None) -> None:
        self.cfg, self.workdir, self.force = cfg, workdir, force
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        # Everything that can fail on bad config or data fails here, before any work.
        self.device = local_device(resolve_device(cfg.train.device))
        rank, world = init_from_env(self.device)
        self.mode: ParallelMode = choose_mode(cfg.train, rank, world, self.device)
        if cfg.data.batch_size % (world * cfg.train.grad_accum):
            raise ValueError(f"data.batch_size={cfg.data.batch_size} must be a multiple of world size "
                             f"{world} x train.grad_accum {cfg.train.grad_accum}.")
        check_writable(workdir)
        self.train_ds, self.test_ds = build_datasets(cfg.data)
        self.model = build_model(cfg, self.train_ds.num_classes).to(self.device)
        # The training forward: the model itself, or with train.compile its compiled
        # form (one graph for every batch of whole routing groups, no graph breaks);
        # under FSDP2 the mode compiles each block instead when it wraps the model.
        self.forward_model: Any = self.model
        if cfg.train.compile and self.mode.compiles_whole_model():
            self.forward_model = torch.compile(self.model, **self._compile_options())
        self.mode.check(self.model)
        self._check_image_size()
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.loss_fn = LOSSES[cfg.train.loss]
        self.hooks = default_hooks() if hooks is None else hooks
        self.stop_reason: Optional[str] = None
        self.stop_signal: Optional[int] = None
        self._last_loss_and_norm = torch.zeros(2, dtype=torch.float64)

    @property
    def rank(self) -> int:
        return self.mode.rank

    @property
    def world(self) -> int:
        return self.mode.world

    def _compile_options(self) -> dict[str, Any]:
        return {"dynamic": True, "fullgraph": True, "backend": self.cfg.train.compile_backend}

    def finite(self, weights: bool = False) -> bool:
        """Whether the last step's loss and gradient norm (and with `weights`,
        this rank's weights) are finite: a host read, which
        `hooks.StopOnDivergence` makes on logged and checkpoint steps only."""
        if not bool(torch.isfinite(self._last_loss_and_norm).all()):
            return False
        return not weights or all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                                  for p in self.model.parameters())  # DTensors: this rank's shard

    def request_stop(self, reason: str, signum: Optional[int] = None) -> None:
        """Ends the loop after the current step (which is checkpointed)."""
        self.stop_reason, self.stop_signal = reason, signum

    def _check_image_size(self) -> None:
        image, _ = self.train_ds[0]
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(to_model_range(torch.as_tensor(image)[None]).to(self.device))
        except ValueError as e:
            raise ValueError(f"The model cannot take this data's images: {e}") from e
        finally:
            self.model.train()

    # ------------------------------------------------------------ workdir
    def _read_identity(self) -> tuple[Optional[str], bool]:
        """(latest checkpoint or None, whether --force must start over).
        Refuses a work dir that holds a checkpoint of another config. Reads
        only: nothing in the work dir changes until `_commit_workdir`."""
        ident_path = os.path.join(self.workdir, "run_identity.json")
        ckpt = latest_checkpoint(self.workdir)
        if ckpt is None or not os.path.exists(ident_path):
            return ckpt, False
        try:
            with open(ident_path) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"Cannot read {ident_path!r} ({e}); restore it, or use --force to start "
                             "over in this work dir.") from e
        ident = run_identity(self.cfg)
        if old == ident:
            return ckpt, False
        diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
        if not self.force:
            raise ValueError(f"Work dir {self.workdir!r} holds a checkpoint of a different config "
                             f"(sections {diff} differ). Use another --workdir, or --force to "
                             "start over in this one (its checkpoints are then deleted).")
        warn_once(f"--force: {self.workdir!r} holds checkpoints of a different config (sections {diff} "
                      "differ); they and metrics.jsonl will be deleted once this run has started.")
        return None, True

    def _setup(self) -> int:
        """Everything that can fail runs before the work dir is touched:
        reading the checkpoint to resume from, sharding, the optimizer. Only
        then is the run committed to the work dir (`_commit_workdir`).
        Returns the first step to run."""
        # Under torchrun the checks below are agreed (`ParallelMode.agree`): a
        # refusal is raised by every rank at once, and reported once.
        ckpt, restart = self.mode.agree(self._read_identity)
        per_block = self.cfg.train.compile and not self.mode.compiles_whole_model()
        self.mode.wrap(self.model, self._compile_options() if per_block else None)
        self._warn_split_groups()
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        optimizer = self.optimizer
        start = 0
        if ckpt is not None:  # either layout, into this run's sharding; falls back past unreadable ones
            state = self.mode.agree(lambda: restore_latest(self.workdir, self.model, optimizer))
            if state is not None:
                start = int(state["step"])
        self.mode.agree(lambda: self._check_progress(start, restart))
        self._commit_workdir(restart)
        if start and self.mode.lead:
            print(f"Resumed from step {start} of {self.cfg.train.steps} in {self.workdir}.", file=sys.stderr)
        return start

    def _check_progress(self, start: int, restart: bool) -> None:
        """Refuses, before the work dir changes, a start that would lose or
        misreport progress: metrics past any readable checkpoint (their
        checkpoints damaged), or a run already past train.steps."""
        steps = self.cfg.train.steps
        if start > steps:
            raise RunRefused(f"Work dir {self.workdir!r} holds a run at step {start}, past train.steps={steps}: "
                             "nothing to train, and its final/ and eval.json stay those of that run. Raise "
                             "train.steps to extend it, or use another --workdir.")
        logged, damaged = last_logged_step(self.workdir), damaged_checkpoints(self.workdir)
        # A kill between checkpoints leaves at most one interval of metrics past the resume point.
        lost = logged > start + self.cfg.train.checkpoint_every or (start == 0 and bool(damaged))
        if lost and not (self.force or restart):
            raise RunRefused(f"Work dir {self.workdir!r} has metrics up to step {logged} but resumes from step "
                             f"{start}{' (damaged checkpoints: ' + ', '.join(damaged) + ')' if damaged else ''}: "
                             "the progress between them would be lost and metrics.jsonl rewritten. Use --force "
                             "to go on from step " + str(start) + ", or another --workdir.")

    def _commit_workdir(self, restart: bool) -> None:
        """Writes the run identity and config.yaml (after a successful set-up
        only, so that a failed start never changes what the work dir accepts);
        with --force over another config, first deletes its checkpoints."""
        self.mode.barrier()  # every rank has read the old identity before rank 0 rewrites it
        self.mode.agree(lambda: self._write_identity(restart) if self.mode.lead else None)

    def _write_identity(self, restart: bool) -> None:
        if restart:
            steps = [s for s, _ in list_checkpoints(self.workdir)]
            shutil.rmtree(os.path.join(self.workdir, "checkpoints"))
            metrics = os.path.join(self.workdir, "metrics.jsonl")
            if os.path.exists(metrics):
                os.unlink(metrics)
            warn_once(f"--force: deleted the previous config's checkpoints (steps {steps}) and "
                      f"metrics.jsonl from {self.workdir!r}.")
        atomic_write_json(os.path.join(self.workdir, "run_identity.json"), run_identity(self.cfg))
        atomic_write_text(os.path.join(self.workdir, "config.yaml"),
                          yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))

    def save(self, step: int) -> str:
        """Checkpoint `step` in the parallel mode's layout."""
        assert self.optimizer is not None
        extra = {"data_position": {"step": step, "batch_size": self.cfg.data.batch_size, "seed": self.cfg.data.seed}}
        files = {"config.json": config_json(self.model.config)}
        try:
            return self.mode.save(self.workdir, step, self.model, self.optimizer, extra,
                                  self.cfg.train.keep_checkpoints, files)
        except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as its own error type
            if getattr(e, "errno", None) != errno.ENOSPC and "No space left on device" not in str(e):
                raise
            last = latest_checkpoint(self.workdir)
            raise RunRefused(f"No space left on device while writing the checkpoint of step {step} in "
                             f"{self.workdir!r}; nothing of it was kept, and the last checkpoint "
                             f"({last or 'none yet'}) is intact. Free space, then rerun the same command to "
                             "resume.") from e

    def _warn_split_groups(self) -> None:
        """Routing groups are cut per process (and micro-batch): when a rank's
        share is not a whole number of groups, routing differs from one process
        on the whole batch."""
        moe = self.model.config.moe
        if moe is None or moe.group_size is None:
            return
        images = self.cfg.data.batch_size // (self.world * self.cfg.train.grad_accum)
        tokens = images * self.model.config.tokens_per_image * moe.ensemble_size
        if tokens < moe.group_size:
            warn_once(
                f"Each process routes {images} images ({tokens} tokens) per micro-batch, fewer than "
                f"group_size={moe.group_size}: every batch is routed as one smaller group, with a capacity "
                "to match. Lower model.moe.group_size or raise data.batch_size to route whole groups.")
        elif tokens % moe.group_size and (self.world > 1 or self.cfg.train.grad_accum > 1):
            warn_once(
                f"Each process routes {images} images ({tokens} tokens) per micro-batch, not a multiple "
                f"of group_size={moe.group_size}: its last routing group is smaller, so routing differs "
                "from one process on the whole batch. Make data.batch_size / (world size x "
                "train.grad_accum) a multiple of the images per group.")

    # ---------------------------------------------------------------- fit
    def fit(self) -> dict[str, Any]:
        """Trains to `train.steps`, resuming from the work dir's newest
        readable checkpoint; one run per work dir (rank 0 holds its lock)."""
        lock = WorkdirLock(self.workdir)

        def take() -> None:  # rank 0 holds the lock; every rank learns whether it got it
            if self.mode.lead:
                lock.acquire()
                for path in remove_orphan_temporaries(self.workdir):
                    warn_once(f"Removed {path!r}, left by a killed write.")
        self.mode.agree(take)
        try:
            return self._fit()
        finally:
            lock.release()

    def _fit(self) -> dict[str, Any]:
        start = self._setup()
        step, status = self._loop(start)
        return self._finish(start, step, status)

    def _loop(self, start: int) -> tuple[int, str]:
        """Steps start..train.steps-1, the hooks after each; returns (last
        step run, status)."""
        cfg = self.cfg
        total = cfg.train.steps
        mixup = None
        if cfg.data.mixup_alpha > 0:
            from torchvision.transforms import v2  # torchvision.transforms.v2 costs start-up
            mixup = v2.MixUp(alpha=cfg.data.mixup_alpha, num_classes=self.train_ds.num_classes)
        loader = step_batches(self.train_ds, cfg.data.batch_size, cfg.data.seed, start, total,
                              cfg.data.num_workers, self.rank, self.world)
        self.model.train()
        step = start
        try:
            for hook in self.hooks:
                hook.start(self, start)
            for step, (images, labels) in zip(range(start, total), loader):
                done = step + 1
                log_now = done % cfg.train.log_every == 0 or done == total
                record = self._train_step(step, images, labels, mixup, log_now)
                for hook in self.hooks:
                    hook.after_step(self, done, record)
                if self.stop_reason is not None:
                    return step, self.stop_reason
            if start < total:
                step = total - 1
            return step, "completed"
        finally:
            for hook in self.hooks:
                hook.end(self)

    def _finish(self, start: int, step: int, status: str) -> dict[str, Any]:
        """The summary; after a completed run, the final evaluation (eval.json)
        and the exported model (final/)."""
        total = self.cfg.train.steps
        summary: dict[str, Any] = {"status": status, "steps": step + 1 if start < total else total}
        if self.stop_signal is not None:
            summary["signal"] = int(self.stop_signal)
            return summary
        if self.mode.sharded:  # the final checkpoint streams to final/, which rank 0 evaluates
            if self.mode.lead:
                path = latest_checkpoint(self.workdir)
                assert path is not None, "a completed run has saved its last step"
                consolidate_checkpoint(path, os.path.join(self.workdir, "final"), overwrite=True)
                self.model = VisionTransformerMoe.from_pretrained(os.path.join(self.workdir, "final")).to(self.device)
        if self.mode.lead:
            final = self.evaluate()
            summary["eval"] = final
            atomic_write_json(os.path.join(self.workdir, "eval.json"), final)
            if not self.mode.sharded:
                self.model.save_pretrained(os.path.join(self.workdir, "final"), overwrite=True)
        self.mode.barrier()
        return summary

    def _train_step(self, step: int, images: torch.Tensor, labels: torch.Tensor, mixup,
                    collect_routing: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        optimizer = self.optimizer
        assert optimizer is not None, "fit() builds the optimizer before the first step"
        torch.manual_seed(step_seed(cfg.train.seed, step))
        self.model.set_noise_seed(step_seed(cfg.train.seed, step))
        lr = learning_rate(step, cfg.train.steps, cfg.optim.lr, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = to_model_range(images.to(self.device, non_blocking=True))
        labels = labels.to(self.device, non_blocking=True)
        if mixup is not None:
            x, targets = mixup(x, labels)
        else:
            targets = F.one_hot(labels, self.train_ds.num_classes).float()
        accum = cfg.train.grad_accum
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # task, auxiliary: read when logged
        routing: dict[str, list[torch.Tensor]] = {}
        members = self.model.ensemble_size
        for xs, ts in zip(x.chunk(accum), targets.chunk(accum)):
            # The routing statistics are computed only on the steps that log them.
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16), \
                    routing_metrics(collect_routing):
                logits, metrics = self.forward_model(xs, return_metrics=True, members=True)
            if members > 1:  # E^3: each member is trained on the labels (reference)
                ts = ts.repeat_interleave(members, dim=0)
            task = self.loss_fn(logits, ts)
            aux = metrics["auxiliary_loss"]
            ((task + aux) / accum).backward()
            totals += torch.stack([task.detach(), aux.detach()]).double() / accum
            for key, value in metrics.items() if collect_routing else ():
                if "/" in key and key.split("/")[1] in _ROUTING_LOG:
                    routing.setdefault(key, []).append(value.detach().float().mean(0))
        grad_norm = self.mode.clip_gradients(self.model, cfg.optim.grad_clip_norm)
        self._last_loss_and_norm = torch.stack([totals.sum(), grad_norm.detach().double()])  # read when checked
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not collect_routing:  # not a logged step: nothing is read back from the device
            return {"step": step + 1}
        totals = self.mode.mean(totals)
        task_total, aux_total = totals.tolist()
        record: dict[str, Any] = {"step": step + 1, "loss": task_total + aux_total, "task_loss": task_total,
                                  "auxiliary_loss": aux_total, "lr": lr, "grad_norm": float(grad_norm)}
        for key, values in routing.items():  # per-layer means over groups (and micro-batches)
            mean = self.mode.mean(torch.stack(values).mean(0))  # and over ranks: every rank's groups
            record[key] = mean.tolist() if mean.dim() else float(mean)
        return record

    def evaluate(self) -> dict[str, float]:
        """Test accuracy at the evaluation capacity factor."""
        loader = eval_batches(self.test_ds, self.cfg.data.eval_batch_size)
        return evaluate_at_capacity(self.model, loader, self.cfg.eval.capacity_factor, bf16=self.cfg.train.bf16)


_ROUTING_LOG = ("importance_loss", "load_loss", "gshard_loss", "dropped_fraction", "expert_load",
                "top_gate_mean")
