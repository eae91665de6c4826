"""Expert-parallel vs single-process equivalence check on CPU gloo processes.

`python -m vmoe_torch.distributed.selfcheck --world-size 4` spawns W
processes; each builds the same model, runs it once unsharded on the whole
batch and once expert-parallel on its share, and compares outputs, auxiliary
losses, gradients, and 5 AdamW training steps (losses and parameters).
The test suite runs it for W = 2 and 4.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import tempfile
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models.factory import create_model
from ..models.vit_moe import VisionTransformerMoe
from .expert_parallel import expert_parallel, gather_state_dict, is_expert_param, sync_gradients
from .runtime import shutdown

CASES: list[dict[str, Any]] = [dict(num_experts=e, num_selected_experts=k, batch_priority=b, capacity_factor=c)
         for e, k, b, c in itertools.product((4, 8), (1, 2), (False, True), (0.5, 1.05))]
# Soft MoE (slots exchanged like capacity buffers) and E^3 (members' experts on different ranks).
CASES += [dict(num_experts=4, router="soft", num_slots=2, noise_std=0.5),
          dict(num_experts=4, num_selected_experts=1, ensemble_size=2, batch_priority=True,
               capacity_factor=0.5)]
# Dropless: a variable number of rows per expert and rank crosses the exchange.
CASES += [dict(num_experts=4, num_selected_experts=2, dropless=True),
          dict(num_experts=8, num_selected_experts=2, batch_priority=True, dropless=True)]
# Optimal-transport routers: tokens choose on an entropic plan (noisy), experts choose on a k-sparse one.
CASES += [dict(num_experts=4, num_selected_experts=2, router="ot_kl_tc", batch_priority=True, capacity_factor=1.05),
          dict(num_experts=4, router="ot_ksparse_ec", capacity_factor=1.0)]


def _model(case: dict) -> VisionTransformerMoe:
    torch.manual_seed(0)
    model = create_model("vmoe_mi4_every1_e8_k2", num_layers=2, layers=(0, 1), patch_size=8, image_size=32,
                         group_size=2 * 17, **case).train()
    model.set_noise_seed(7)
    return model


def _xent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy; E^3 logits have one row per (image, member)."""
    members = logits.shape[0] // labels.shape[0]
    return F.cross_entropy(logits, labels.repeat_interleave(members))


def _mean(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def _check_case(case: dict, batch: int, rank: int, world: int) -> dict[str, float]:
    full = _model(case)
    ep = cast(VisionTransformerMoe, expert_parallel(copy.deepcopy(full)))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    share = slice(rank * batch // world, (rank + 1) * batch // world)

    logits, metrics = full(x, return_metrics=True, members=True)  # E^3: the reference's member rows
    (_xent(logits, y) + metrics["auxiliary_loss"]).backward()
    logits_r, metrics_r = ep(x[share], return_metrics=True, members=True)
    (_xent(logits_r, y[share]) + metrics_r["auxiliary_loss"]).backward()
    sync_gradients(ep)

    m = full.ensemble_size  # E^3: rows b*M + m
    rows = slice(share.start * m, share.stop * m)
    out = {"logits": float((logits_r - logits[rows]).detach().abs().max()),
           "aux": float((_mean(metrics_r["auxiliary_loss"]) - metrics["auxiliary_loss"]).abs())}
    full_grads = dict(full.named_parameters())
    grad_diff = 0.0
    for name, p in ep.named_parameters():
        if is_expert_param(name):
            ref_name = name.replace(".local.", ".")
            per = p.shape[0]
            full_grad = full_grads[ref_name].grad
            assert full_grad is not None
            ref = full_grad[rank * per:(rank + 1) * per]
        else:
            full_grad = full_grads[name].grad
            assert full_grad is not None
            ref = full_grad
        assert p.grad is not None
        grad_diff = max(grad_diff, float((p.grad - ref).abs().max()))
    out["grads"] = grad_diff
    return out


TRAINING: dict[str, dict[str, Any]] = {
    "training": dict(num_experts=8, num_selected_experts=2, batch_priority=True, capacity_factor=0.5),
    "training_dropless": dict(num_experts=8, num_selected_experts=2, dropless=True)}


def _check_training(case: dict, rank: int, world: int, batch: int, steps: int = 5) -> dict[str, float]:
    full = _model(case)
    ep = cast(VisionTransformerMoe, expert_parallel(copy.deepcopy(full)))
    # SGD with momentum (the paper's fine-tuning optimiser). Adam would divide
    # float32 rounding noise on near-zero gradients by sqrt(v) ~ |g| and turn
    # 1e-8 gradient differences into lr-sized parameter differences.
    opt_f = torch.optim.SGD(full.parameters(), lr=0.05, momentum=0.9)
    opt_e = torch.optim.SGD(ep.parameters(), lr=0.05, momentum=0.9)
    share = slice(rank * batch // world, (rank + 1) * batch // world)
    loss_diff = 0.0
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        for m in (full, ep):
            m.set_noise_seed(1000 + step)
        logits, metrics = full(x, return_metrics=True, members=True)
        loss = F.cross_entropy(logits, y) + metrics["auxiliary_loss"]
        loss.backward()
        opt_f.step(), opt_f.zero_grad()
        logits_r, metrics_r = ep(x[share], return_metrics=True, members=True)
        loss_r = F.cross_entropy(logits_r, y[share]) + metrics_r["auxiliary_loss"]
        loss_r.backward()
        sync_gradients(ep)
        opt_e.step(), opt_e.zero_grad()
        loss_diff = max(loss_diff, float((_mean(loss_r) - loss.detach()).abs()))
    gathered = gather_state_dict(ep)
    param_diff = max(float((gathered[k] - v).abs().max()) for k, v in full.state_dict().items())
    return {"train_loss": loss_diff, "train_params": param_diff}


def case_name(case: dict) -> str:
    return "_".join(f"{k}={v}" for k, v in case.items())


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ok = False
    try:
        batch = 8
        results = {}
        for case in CASES:
            results[case_name(case)] = _check_case(case, batch, rank, world)
        for name, case in TRAINING.items():
            results[name] = _check_training(case, rank, world, batch)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        ok = True
    finally:  # a barrier on success first, so no rank tears down a peer's connections
        shutdown(synchronize=ok)


def run(world: int, out_dir: str) -> dict[str, dict[str, float]]:
    """Spawns `world` processes; returns the worst difference of each check over ranks."""
    import torch.multiprocessing as mp
    init_file = os.path.join(out_dir, "init")
    mp.spawn(worker, args=(world, init_file, out_dir), nprocs=world, join=True)
    worst: dict[str, dict[str, float]] = {}
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            for case, diffs in json.load(f).items():
                for k, v in diffs.items():
                    worst.setdefault(case, {})[k] = max(worst.get(case, {}).get(k, 0.0), v)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        worst = run(args.world_size, d)
    for case, diffs in worst.items():
        print(case, " ".join(f"{k}={v:.2e}" for k, v in diffs.items()))


if __name__ == "__main__":
    main()
