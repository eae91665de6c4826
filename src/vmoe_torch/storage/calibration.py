"""A model's measured accuracy-compute curve (`calibration.json`), and the
rule that picks a routing setting for a compute budget from it.

`vmoe calibrate` (`evaluate.calibration`) measures, for each routing setting
that changes compute without retraining (K, capacity factor, BPR, dropless),
top-1 on a held-out split, FLOPs per image counted from what ran, and
latency; this module stores the result beside the weights, versioned, and
chooses from its Pareto frontier. Schema (version 1):

    {"format": "vmoe-torch-calibration", "version": 1,
     "measured_on": {"split", "images", "batch_size", "cpu", "torch"},
     "reference": <the index of the point measured at the model's own routing>,
     "points": [{"routing": {...set_routing keywords...}, "top1", "flops_per_image",
                 "latency_ms", "images_per_s", "frontier": bool}, ...]}
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..utils.io import atomic_write_json

FORMAT, VERSION = "vmoe-torch-calibration", 1
FILE = "calibration.json"
ROUTING_KEYS = ("num_selected_experts", "capacity_factor", "batch_priority", "dropless")


@dataclass
class Point:
    """One measured routing setting."""

    routing: dict[str, Any]
    top1: float
    flops_per_image: float
    latency_ms: float = 0.0
    images_per_s: float = 0.0
    frontier: bool = False

    def describe(self) -> str:
        r = self.routing
        parts = [f"K={r['num_selected_experts']}"] if "num_selected_experts" in r else []
        if r.get("dropless"):
            parts.append("dropless")
        elif r.get("capacity_factor") is not None:
            parts.append(f"C={r['capacity_factor']:g}")
        if r.get("batch_priority") and not r.get("dropless"):
            parts.append("BPR")
        return ", ".join(parts) or "as configured"


@dataclass
class Calibration:
    points: list[Point]
    reference: int  # index of the point at the model's own routing: "full compute"
    measured_on: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("A calibration needs at least one measured point.")
        if not 0 <= self.reference < len(self.points):
            raise ValueError(f"Calibration reference {self.reference} is not one of its "
                             f"{len(self.points)} points.")
        mark_frontier(self.points)

    @property
    def full(self) -> Point:
        return self.points[self.reference]

    def frontier(self) -> list[Point]:
        """The Pareto frontier, cheapest first: no other point is at most as
        expensive and more accurate."""
        return sorted((p for p in self.points if p.frontier), key=lambda p: p.flops_per_image)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "measured_on": self.measured_on,
                "reference": self.reference, "points": [vars(p) for p in self.points]}

    @classmethod
    def from_json(cls, data: Any, where: str = FILE) -> "Calibration":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{where} is not a {FORMAT} file.")
        if data.get("version") != VERSION:
            raise ValueError(f"{where}: unsupported calibration version {data.get('version')!r} "
                             f"(this library reads version {VERSION}); re-run vmoe calibrate.")
        try:
            points = [Point(routing=dict(p["routing"]), top1=float(p["top1"]),
                            flops_per_image=float(p["flops_per_image"]),
                            latency_ms=float(p.get("latency_ms", 0.0)),
                            images_per_s=float(p.get("images_per_s", 0.0))) for p in data["points"]]
            return cls(points, int(data["reference"]), dict(data.get("measured_on", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where} is damaged ({type(e).__name__}: {e}); re-run vmoe calibrate.") from e


def mark_frontier(points: list[Point]) -> None:
    """Sets `frontier` on the points that no cheaper-or-equal point beats."""
    best = float("-inf")
    for p in sorted(points, key=lambda p: (p.flops_per_image, -p.top1)):
        p.frontier = p.top1 > best
        best = max(best, p.top1)


def choose(cal: Calibration, flops: Optional[float] = None, relative: Optional[float] = None,
           accuracy_drop: Optional[float] = None) -> Point:
    """The frontier point for one request (exactly one of):

    - `flops`: the most accurate point at or under this many FLOPs per image
      (1e-9 relative slack, so that `relative=p.flops / full.flops` picks p
      despite float rounding);
    - `relative`: the same at `relative` x the reference point's FLOPs;
    - `accuracy_drop`: the cheapest point within `accuracy_drop` (absolute
      top-1) of the reference point's accuracy.
    """
    given = [n for n, v in (("flops", flops), ("relative", relative), ("accuracy_drop", accuracy_drop))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"Give exactly one of flops=, relative=, accuracy_drop= (got {given or 'none'}).")
    frontier = cal.frontier()
    if accuracy_drop is not None:
        if not accuracy_drop >= 0:
            raise ValueError(f"accuracy_drop must be >= 0 (a fraction of top-1), got {accuracy_drop!r}.")
        floor = cal.full.top1 - accuracy_drop
        return next(p for p in frontier if p.top1 >= floor - 1e-12)  # the reference point qualifies
    if relative is not None:
        if not 0 < relative < float("inf"):
            raise ValueError(f"relative must be a positive fraction of full compute, got {relative!r}.")
        flops = relative * cal.full.flops_per_image
    assert flops is not None
    fitting = [p for p in frontier if p.flops_per_image <= flops * (1 + 1e-9)]
    if not fitting:
        cheapest = frontier[0]
        raise ValueError(f"No calibrated setting runs within {flops:,.0f} FLOPs per image "
                         f"({flops / cal.full.flops_per_image:.0%} of full compute); the cheapest is "
                         f"{cheapest.describe()} at {cheapest.flops_per_image:,.0f} "
                         f"({cheapest.flops_per_image / cal.full.flops_per_image:.0%}).")
    return max(fitting, key=lambda p: (p.top1, -p.flops_per_image))


def parse_request(text: str) -> dict[str, float]:
    """"relative=0.5" / "flops=2e7" / "accuracy_drop=0.01" -> keyword arguments."""
    key, sep, value = text.partition("=")
    if not sep or key not in ("relative", "flops", "accuracy_drop"):
        raise ValueError(f"Budget {text!r}: use relative=F, flops=N or accuracy_drop=F.")
    try:
        return {key: float(value)}
    except ValueError as e:
        raise ValueError(f"Budget {text!r}: {value!r} is not a number.") from e


def read_calibration(path: str) -> Optional[Calibration]:
    """The calibration in model directory `path`, or None when it has none."""
    file = os.path.join(path, FILE)
    if not os.path.exists(file):
        return None
    try:
        with open(file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file!r} is not valid JSON ({e}); re-run vmoe calibrate.") from e
    return Calibration.from_json(data, file)


def write_calibration(path: str, cal: Calibration) -> None:
    atomic_write_json(os.path.join(path, FILE), cal.to_json())


def card_lines(cal: Optional[Calibration]) -> list[str]:
    """The model card's table of the frontier."""
    if cal is None:
        return []
    full = cal.full.flops_per_image
    m = cal.measured_on
    lines = ["", "## Compute budgets", "",
             f"Measured by `vmoe calibrate` on {m.get('images', '?')} images of split `{m.get('split', '?')}`"
             f" (batch {m.get('batch_size', '?')}, {m.get('cpu', 'CPU')}); choose with "
             "`model.at_budget(relative=...)`.", "",
             "| routing | top-1 | GFLOPs / image | of full | latency (ms / batch) |", "|---|---|---|---|---|"]
    for p in cal.frontier():
        lines.append(f"| {p.describe()} | {p.top1:.4f} | {p.flops_per_image / 1e9:.4f} | "
                     f"{p.flops_per_image / full:.0%} | {p.latency_ms:.1f} |")
    return lines
