"""Load test of `vmoe serve` on loopback: N concurrent clients for T seconds,
each sending requests of a few images, at the model's own routing and at a
budget; reports requests/s, images/s and p50 / p99 latency per budget, in
one run, with the CPU's ISA. The served model must be calibrated for the
budget rows (vmoe calibrate).

Each runtime in --runtimes (eager, exported: `vmoe serve --runtime`) gets
its own server, one after the other, so that the rows compare them on the
same machine in the same run; the exported server's programs are exported
by a warm-up request per budget, outside the timed window.

Usage: python benchmarks/serve_load.py MODEL_DIR [--clients 8] [--seconds 10]
       [--images 4] [--budgets own,relative=0.5] [--format png|array]
       [--runtimes eager,exported]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import torch

from vmoe_torch import from_pretrained


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _encode(images: np.ndarray, fmt: str) -> dict:
    if fmt == "array":
        return {"arrays": images.tolist()}
    import base64
    import io

    from PIL import Image
    files = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(buf, format="PNG")
        files.append(base64.b64encode(buf.getvalue()).decode())
    return {"images": files}


def _run(port: int, clients: int, seconds: float, images: np.ndarray, budget: dict | None, fmt: str) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    body = {**_encode(images, fmt), **({"budget": budget} if budget else {})}
    routing = {}

    def client() -> None:
        while time.monotonic() < stop:
            start = time.perf_counter()
            out = _post(port, body)
            with lock:
                latencies.append(time.perf_counter() - start)
                routing["setting"], routing["flops"] = out["routing"], out["flops_per_image"]
    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"requests_per_s": len(lat) / wall, "images_per_s": len(lat) * len(images) / wall,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            **routing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--images", type=int, default=4, help="images per request")
    ap.add_argument("--budgets", default="own,relative=0.5")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--format", choices=("png", "array"), default="png", help="how requests carry images")
    ap.add_argument("--runtimes", default="eager,exported")
    args = ap.parse_args()
    cfg = from_pretrained(args.model).config
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, *cfg.image_size, cfg.in_chans)).astype(np.uint8)
    print(f"{platform.processor() or platform.machine()}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, {os.cpu_count()} cores; "
          f"{args.clients} clients x {args.images} {args.format} images / request for {args.seconds:g} s each, "
          f"server batches up to {args.max_batch} images")
    print("| runtime | budget | setting | MFLOPs / image | requests / s | images / s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for runtime in args.runtimes.split(","):
        _serve_rows(args, runtime, images)


def _serve_rows(args: argparse.Namespace, runtime: str, images: np.ndarray) -> None:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "vmoe_torch.cli.main", "serve", args.model, "--port", str(port),
                               "--max-batch", str(args.max_batch), "--runtime", runtime], stdout=subprocess.DEVNULL)
    try:
        for _ in range(1200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(0.1)
        for text in args.budgets.split(","):
            budget = None if text == "own" else {text.split("=")[0]: float(text.split("=")[1])}
            _run(port, args.clients, 1.0, images, budget, args.format)  # warm-up (exports the budget's program)
            r = _run(port, args.clients, args.seconds, images, budget, args.format)
            print(f"| {runtime} | {text} | {r['setting']} | {r['flops'] / 1e6:.2f} | {r['requests_per_s']:.1f} | "
                  f"{r['images_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


if __name__ == "__main__":
    main()
