"""Running a model at a compute budget, chosen from its measured calibration
(`storage.calibration`): `model.at_budget(relative=0.5)` sets the routing of
the best frontier point within half the full compute; `with
model.at_budget(...):` restores the previous routing on exit."""
from __future__ import annotations

from typing import Any, Optional

from ..storage.calibration import Calibration, Point, choose


class BudgetSetting:
    """The routing an `at_budget` request chose (already applied). As a
    context manager it restores the routing the model had before."""

    def __init__(self, model: Any, point: Point, saved: dict[str, Any]) -> None:
        self.model, self.point, self._saved = model, point, saved

    @property
    def routing(self) -> dict[str, Any]:
        return dict(self.point.routing)

    @property
    def flops_per_image(self) -> float:
        return self.point.flops_per_image

    def __enter__(self) -> "BudgetSetting":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.model._restore_routing(self._saved)

    def __repr__(self) -> str:
        return (f"BudgetSetting({self.point.describe()}: top-1 {self.point.top1:.4f}, "
                f"{self.point.flops_per_image:,.0f} FLOPs / image)")


class BudgetControl:
    """Mixin: `calibration` (None until measured or loaded) and `at_budget`.
    Needs RoutingControl's `set_routing`, `routing_settings` and
    `_restore_routing`."""

    calibration: Optional[Calibration]

    def at_budget(self, flops: Optional[float] = None, relative: Optional[float] = None,
                  accuracy_drop: Optional[float] = None) -> BudgetSetting:
        """Sets the routing of the calibration frontier point that best meets
        one request: `flops` (FLOPs per image), `relative` (a fraction of the
        model's own routing's compute) or `accuracy_drop` (the cheapest point
        within this much top-1 of the model's own routing). Returns the
        choice, also usable as `with model.at_budget(...):`."""
        cal = getattr(self, "calibration", None)
        if cal is None:
            raise ValueError("This model has no calibration to choose a budget from. Measure one with "
                             "`vmoe calibrate MODEL_DIR --config CONFIG` (it writes MODEL_DIR/calibration.json, "
                             "which from_pretrained loads), or set model.calibration = "
                             "vmoe_torch.evaluate.calibration.calibrate(model, ...).")
        point = choose(cal, flops=flops, relative=relative, accuracy_drop=accuracy_drop)
        saved = self.routing_settings()  # type: ignore[attr-defined]
        self.set_routing(**point.routing)  # type: ignore[attr-defined]
        return BudgetSetting(self, point, saved)
