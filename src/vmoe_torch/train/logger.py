"""Metrics to WORKDIR/metrics.jsonl (one JSON object per logged step) and,
when the tensorboard package is installed, to WORKDIR/tb/."""
from __future__ import annotations

import json
import os
import warnings
from typing import Any

from ..utils.io import atomic_write_text


class MetricsLogger:
    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step or None)
            except ImportError:
                warnings.warn("tensorboard is not installed; metrics go to metrics.jsonl only.")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the file matches an
        uninterrupted run (rewritten atomically)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        keep = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:  # a write torn by a kill: the step is redone anyway
                    warnings.warn(f"{self.path}: dropped a torn last line ({line[:60]!r}...).")
                    continue
                raise ValueError(f"{self.path}, line {i + 1}, is not valid JSON ({e}) and is not the "
                                 "last line: the file was edited or damaged; fix or remove that line.") from e
            if record.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        atomic_write_text(self.path, "".join(keep))

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
