"""`vmoe serve` on loopback: concurrent clients with mixed budgets get what
the model computes offline on the same batches (the documented grouping
rule), every bad input is a 4xx and the server keeps serving, and SIGTERM
finishes the requests in flight."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from vmoe_torch import create_model, from_pretrained  # noqa: E402
from vmoe_torch.storage.calibration import Calibration, Point  # noqa: E402

OWN = {"num_selected_experts": 2, "capacity_factor": 1.05, "batch_priority": False, "dropless": False}
CHEAP = {"num_selected_experts": 1, "capacity_factor": 0.5, "batch_priority": True, "dropless": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("vmoe_mi4_every2_e8_k2", num_classes=10).eval()
    torch.nn.init.normal_(model.head.weight)
    model.calibration = Calibration([Point(OWN, 0.8, 100.0), Point(CHEAP, 0.7, 50.0)], reference=0)
    path = tmp_path_factory.mktemp("served") / "m"
    model.save_pretrained(str(path))
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir, *extra):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vmoe_torch.cli.main", "serve", str(model_dir), "--port", str(port),
                             "--threads", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if _get(port, "/health")[0] == 200:
                return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read()) from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def _get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return r.status, json.loads(r.read())


def _post(port, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module", params=["eager", pytest.param("exported", marks=pytest.mark.slow)])
def server(model_dir, request):
    """Both runtimes: with the exported one, a batch's whole routing groups
    (8 images here) run through the budget's program, the rest eagerly."""
    proc, port = _start(model_dir, "--max-batch", "12", "--batch-timeout-ms", "30", "--max-images", "8",
                        "--runtime", request.param)
    assert _get(port, "/health")[1]["runtime"]["runtime"] == request.param
    yield port
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def _images(rng, n):
    return rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)


def test_concurrent_mixed_budgets_equal_offline_predictions(server, model_dir):
    results, lock = [], threading.Lock()

    def client(seed):
        rng = np.random.default_rng(seed)
        for i in range(3):
            images = _images(rng, int(rng.integers(1, 5)))
            budget = {"relative": 0.6} if (seed + i) % 2 else None
            body = {"arrays": images.tolist(), **({"budget": budget} if budget else {})}
            status, out = _post(server, body)
            assert status == 200, out
            with lock:
                results.append((images, budget, out))
    threads = [threading.Thread(target=client, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batches: dict = {}
    for images, budget, out in results:
        batches.setdefault(out["batch"]["id"], []).append((out["batch"]["offset"], images, budget, out))
    assert any(len(b) > 1 for b in batches.values()), "no two requests were batched together"
    model = from_pretrained(str(model_dir))
    for members in batches.values():
        members.sort(key=lambda m: m[0])
        assert len({json.dumps(m[2]) for m in members}) == 1  # one budget per batch
        x = torch.from_numpy(np.concatenate([m[1] for m in members])).permute(0, 3, 1, 2).float() / 127.5 - 1
        budget = members[0][2]
        with torch.no_grad():
            if budget:
                with model.at_budget(**budget):
                    probs = model(x).softmax(-1)
            else:
                probs = model(x).softmax(-1)
        assert members[-1][0] + len(members[-1][1]) == members[0][3]["batch"]["size"] == len(x)
        for offset, images, _, out in members:
            for j, pred in enumerate(out["predictions"]):
                row = probs[offset + j]
                assert pred["label"] == int(row.argmax())
                assert abs(pred["top5"][0][1] - float(row.max())) < 1e-5
            assert out["routing"] == ("K=1, C=0.5, BPR" if budget else "as configured")
            assert out["flops_per_image"] == (50.0 if budget else 100.0)


def _png(array):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_every_bad_input_is_a_4xx_and_the_server_keeps_serving(server):
    rng = np.random.default_rng(0)
    good = _images(rng, 1)
    nan = good.astype(float)
    nan[0, 0, 0, 0] = float("nan")
    cases = {
        "undecodable": ({"images": ["bm90IGFuIGltYWdl"]}, 400, "cannot be decoded"),
        "wrong size": ({"images": [_png(_images(rng, 1)[0][:16])]}, 422, "takes 32x32"),
        "wrong channels": ({"arrays": good[..., :1].tolist()}, 422, "channel"),
        "NaN": ({"arrays": nan.tolist()}, 422, "NaN"),
        "unknown budget": ({"arrays": good.tolist(), "budget": {"speed": 2}}, 400, "budget"),
        "unmet budget": ({"arrays": good.tolist(), "budget": {"relative": 0.1}}, 422, "cheapest"),
        "oversized": ({"arrays": _images(rng, 9).tolist()}, 413, "at most 8"),
        "no image": ({}, 400, "No image"),
        "unknown field": ({"arrays": good.tolist(), "foo": 1}, 400, "Unknown field"),
    }
    for name, (body, status, text) in cases.items():
        got, out = _post(server, body)
        assert got == status and text in out["error"], (name, got, out)
        assert _post(server, {"images": [_png(good[0])]})[0] == 200, name  # still serving
    got, out = _post(server, None, raw=b"{not json")
    assert got == 400
    metrics = _get(server, "/metrics")[1]
    assert metrics["errors_422"] >= 4 and metrics["requests"] >= len(cases)


@pytest.mark.reliability
def test_sigterm_finishes_the_requests_in_flight(model_dir):
    proc, port = _start(model_dir, "--batch-timeout-ms", "400", "--max-batch", "64", "--runtime", "eager")
    rng = np.random.default_rng(1)
    answers = []

    def client():
        answers.append(_post(port, {"arrays": _images(rng, 2).tolist()}))
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while time.time() < deadline and _get(port, "/health")[1]["pending"] == 0:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    assert [status for status, _ in answers] == [200] * 4, answers
    # uvicorn re-raises the signal once it has shut down, so supervisors see a SIGTERM exit.
    assert proc.wait(timeout=60) == -signal.SIGTERM
    assert "Traceback" not in proc.stderr.read()
