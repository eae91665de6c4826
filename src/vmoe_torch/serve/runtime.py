"""What runs a batch: the model eagerly, or `torch.export` programs.

An exported program fixes the routing it was traced with, so there is one
program per routing setting (the model's own, and each budget's frontier
point), exported the first time that setting is asked for and kept. Its
batch is dynamic in whole routing groups (`export.batch_multiple` images,
k); a batch of n images runs its first n - n mod k images through the
program and the rest eagerly. The eager model would route exactly those
groups (whole groups, then a smaller last one), so both runtimes give the
same predictions, up to float rounding between the two kernels' paths.

`choose_runtime` measures both on one batch of the server's largest size at
the model's own routing and keeps the faster; the measurement is reported
by `/health`.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

import torch

RUNTIMES = ("auto", "eager", "exported")


class Eager:
    """Runs the model in eval mode (the routing of the active context)."""

    name = "eager"

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, key: str, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


class Exported:
    """One exported program per routing key. The caller runs each key in
    its routing (`Runner`), so a key's first batch exports the model as it
    routes then."""

    name = "exported"

    def __init__(self, model: Any) -> None:
        from ..export import batch_multiple
        self.model = model
        self.multiple = batch_multiple(model)
        self.programs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def program(self, key: str, images: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        if key not in self.programs:
            from ..export import export_program
            self.programs[key] = export_program(self.model, images[:1]).module()
        return self.programs[key]

    def __call__(self, key: str, images: torch.Tensor) -> torch.Tensor:
        whole = len(images) - len(images) % self.multiple
        if whole == 0:
            return self.model(images)
        out = self.program(key, images)(images[:whole])
        if whole == len(images):
            return out
        return torch.cat([out, self.model(images[whole:])])


def _median_ms(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up (and, for the exported runtime, the export itself)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def choose_runtime(model: Any, requested: str, max_batch: int, repeats: int = 5) -> tuple[Any, dict[str, Any]]:
    """(runtime, report). `requested` is one of RUNTIMES; "auto" measures
    eager and exported on `max_batch` random images at the model's own
    routing and keeps the faster. The report names the choice, why, and the
    measured milliseconds per batch."""
    if requested not in RUNTIMES:
        raise ValueError(f"Unknown runtime {requested!r}; use one of {', '.join(RUNTIMES)}.")
    eager = Eager(model)
    report: dict[str, Any] = {"runtime": "eager", "batch": max_batch}
    if requested == "eager":
        return eager, {**report, "reason": "requested"}
    try:
        exported = Exported(model)
    except ValueError as e:  # the batch cannot be dynamic (one routing group per batch)
        if requested == "exported":
            raise ValueError(f"--runtime exported is not possible for this model: {e}") from e
        return eager, {**report, "reason": f"not exportable: {e}"}
    if requested == "exported":
        return exported, {**report, "runtime": "exported", "reason": "requested"}
    if max_batch < exported.multiple:
        return eager, {**report, "reason": f"a batch of {max_batch} images fills no whole routing groups "
                                           f"({exported.multiple} images do)"}
    cfg = model.config
    images = torch.randn(max_batch, cfg.in_chans, *cfg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        runs: dict[str, Callable[[str, torch.Tensor], torch.Tensor]] = {"eager": eager, "exported": exported}
        ms = {name: _median_ms(functools.partial(r, "", images), repeats) for name, r in runs.items()}
    chosen: Any = exported if ms["exported"] < ms["eager"] else eager
    return chosen, {**report, "runtime": chosen.name, "reason": "faster", "ms_per_batch":
                    {k: round(v, 3) for k, v in ms.items()}}
