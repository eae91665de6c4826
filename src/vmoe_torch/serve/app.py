"""The HTTP application (FastAPI on uvicorn). (No `from __future__ import
annotations` here: FastAPI reads the endpoints' annotations at run time.)

FastAPI + uvicorn were chosen over LitServe, TorchServe, Ray Serve and
BentoML: they are the most widely kept Python serving stack, uvicorn's
graceful shutdown finishes requests in flight on SIGTERM, and nothing else
is needed: the batching rule (whole routing groups, one budget per batch,
`serve.batcher`) is specific to MoE routing, so no library's generic
dynamic batcher would apply it; TorchServe is no longer maintained, and Ray
Serve or BentoML would bring a cluster runtime or a packaging format for a
one-process server.

    POST /predict  {"images"|"arrays", "budget"?} -> predictions, the routing
                   used, FLOPs per image, and the batch the request ran in
    GET  /health   status and queue length
    GET  /metrics  request, image, error and latency counters (JSON)
"""
import asyncio
import contextlib
import json
import time
from collections import Counter, deque
from typing import Any, AsyncIterator, Optional

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..evaluate.calibration import count_flops
from ..storage.calibration import choose
from .batcher import Batcher
from .inputs import BadRequest, parse_budget, parse_images
from .runtime import Eager, choose_runtime


class Runner:
    """Runs one batch at one budget (on the inference thread), through
    `runtime` (`serve.runtime`: eager or exported programs) in the budget's
    routing."""

    def __init__(self, model: Any, runtime: Any = None) -> None:
        self.model = model.eval()
        self.runtime = runtime or Eager(model)
        self.own_flops: Optional[float] = None if model.calibration is None else model.calibration.full.flops_per_image

    @torch.no_grad()
    def __call__(self, key: str, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        if key:
            with self.model.at_budget(**json.loads(key)) as chosen:
                probs = self.runtime(key, images).softmax(-1)
            return probs, {"routing": chosen.point.describe(), "flops_per_image": chosen.flops_per_image}
        probs = self.runtime(key, images).softmax(-1)
        if self.own_flops is None:  # measured once, on the first batch
            self.own_flops = count_flops(self.model, images)
        return probs, {"routing": "as configured", "flops_per_image": self.own_flops}


class Stats:
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.latencies: deque[float] = deque(maxlen=1000)

    def snapshot(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> Optional[float]:
            return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None
        return {**dict(self.counts), "latency_ms_p50": pct(0.5), "latency_ms_p99": pct(0.99)}


def create_app(model: Any, max_batch: int = 64, batch_timeout_ms: float = 5.0, max_images: int = 64,
               max_body_bytes: int = 32 << 20, runtime: str = "eager") -> Any:
    """The FastAPI application serving `model` (a VisionTransformerMoe);
    `runtime`: "eager", "exported" or "auto" (the faster of the two,
    measured here: `serve.runtime.choose_runtime`)."""
    cfg = model.config
    stats = Stats()
    chosen, runtime_report = choose_runtime(model.eval(), runtime, max_batch)
    batcher = Batcher(Runner(model, chosen), max_batch, batch_timeout_ms / 1000)
    state = {"status": "ok"}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        state["status"] = "shutting_down"
        await asyncio.to_thread(batcher.close)  # every accepted request is answered first

    app = FastAPI(title="vmoe-torch", lifespan=lifespan)
    app.state.runtime = runtime_report

    def error(status: int, message: str) -> Any:
        stats.counts[f"errors_{status}"] += 1
        return JSONResponse({"error": message}, status_code=status)

    @app.post("/predict")
    async def predict(request: Request) -> Any:
        start = time.perf_counter()
        if int(request.headers.get("content-length") or 0) > max_body_bytes:
            return error(413, f"The body is over {max_body_bytes} bytes.")
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "The body is not valid JSON.")
        try:
            images = parse_images(body, cfg.image_size, cfg.in_chans, max_images)
            budget = parse_budget(body.get("budget"))
            if budget is not None:
                if model.calibration is None:
                    raise BadRequest(422, "This model has no calibration, so it takes no budget (vmoe calibrate).")
                try:
                    choose(model.calibration, **budget)
                except ValueError as e:
                    raise BadRequest(422, str(e)) from e
        except BadRequest as e:
            return error(e.status, str(e))
        try:
            future = batcher.submit(images, json.dumps(budget, sort_keys=True) if budget else "")
        except RuntimeError as e:
            return error(503, str(e))
        probs, info = await asyncio.wrap_future(future)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1)
        predictions = [{"label": int(i[0]), "top5": [[int(c), round(float(p), 6)] for c, p in zip(i, v)]}
                       for i, v in zip(top.indices, top.values)]
        stats.counts["requests"] += 1
        stats.counts["images"] += len(predictions)
        stats.counts[f"routing {info['routing']}"] += len(predictions)
        stats.latencies.append(time.perf_counter() - start)
        return {"predictions": predictions, "routing": info["routing"],
                "flops_per_image": info["flops_per_image"],
                "batch": {k: info[k] for k in ("id", "offset", "size")}}

    @app.get("/health")
    async def health() -> Any:
        return {"status": state["status"], "pending": len(batcher.pending),
                "image_size": list(cfg.image_size), "classes": cfg.num_classes,
                "calibrated": model.calibration is not None, "runtime": runtime_report}

    @app.get("/metrics")
    async def metrics() -> Any:
        return stats.snapshot()

    return app
