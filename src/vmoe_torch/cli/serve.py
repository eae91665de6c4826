"""`vmoe serve`: an HTTP inference server for a from_pretrained directory."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a saved model over HTTP, with per-request compute budgets",
                       description="POST /predict with JSON {\"images\": [base64 files], \"arrays\": [H x W x C "
                                   "pixel values], \"budget\": {\"relative\": 0.5}}; GET /health, /metrics. "
                                   "Budgets need a calibration (vmoe calibrate). SIGTERM finishes the requests "
                                   "in flight, then exits.")
    p.add_argument("model", help="a from_pretrained directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=64, help="images per forward")
    p.add_argument("--batch-timeout-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests of its budget")
    p.add_argument("--max-images", type=int, default=64, help="images per request (more: 413)")
    p.add_argument("--runtime", choices=("auto", "eager", "exported"), default="auto",
                   help="run the model eagerly, or as torch.export programs (one per routing setting, "
                        "exported on first use); auto measures both at start-up and keeps the faster")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from ..models import VisionTransformerMoe
    from ..serve.app import create_app
    for name in ("max_batch", "max_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1.")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = VisionTransformerMoe.from_pretrained(args.model)
    app = create_app(model, args.max_batch, args.batch_timeout_ms, args.max_images, runtime=args.runtime)
    print(f"serving {args.model} on http://{args.host}:{args.port} ({app.state.runtime})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=60)
    return 0
