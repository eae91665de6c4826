"""GPU checks: run where CUDA is present, skipped elsewhere (CI has no GPU).

The MoE layer on CUDA equals the CPU computation, runs forward and backward
with no host-device synchronisation (torch.cuda.set_sync_debug_mode("error")),
keeps the router in float32 under bf16 autocast, and the dropless backend
uses grouped matmuls in bf16. The GPU benchmark script is also run on the CPU
at tiny shapes, so that it is known to run before it meets a GPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vmoe_torch.moe import MoeMlp

ROOT = Path(__file__).resolve().parents[2]
_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda(test):
    """A GPU check: marked `gpu` (make test-gpu collects these) and skipped without CUDA."""
    return pytest.mark.gpu(_needs_cuda(test))


def _layer(**routing) -> MoeMlp:
    torch.manual_seed(0)
    return MoeMlp(64, 128, 8, group_size=64, num_selected_experts=2, batch_priority=True, **routing)


@cuda
@pytest.mark.parametrize("routing", [{}, {"capacity_factor": 0.5}, {"dropless": True}],
                         ids=["C1.05", "C0.5", "dropless"])
def test_cuda_layer_equals_cpu_in_training(routing):
    cpu = _layer(**routing).train()
    gpu = _layer(**routing).cuda().train()
    cpu.noise_seed = gpu.noise_seed = 5
    x = torch.randn(4, 64, 64)
    y_cpu, m_cpu = cpu(x)
    y_gpu, m_gpu = gpu(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m_gpu["auxiliary_loss"].cpu(), m_cpu["auxiliary_loss"], rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.parametrize("routing", [{}, {"dropless": True}], ids=["capacity", "dropless"])
def test_no_host_sync_in_the_moe_forward_and_backward(routing):
    layer = _layer(**routing).cuda().train()
    layer.noise_seed = 1
    x = torch.randn(8, 64, 64, device="cuda", requires_grad=True)
    layer(x)  # warm-up outside the check (lazy initialisation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, metrics = layer(x)
        (y.float().square().mean() + metrics["auxiliary_loss"]).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_router_stays_float32_under_bf16_autocast():
    layer = _layer().cuda().eval()
    x = torch.randn(2, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = layer.router_logits(x)
        y, _ = layer(x)
    assert logits.dtype == torch.float32 and y.dtype == x.dtype  # routing in fp32, the output in the input dtype


@pytest.mark.slow
def test_gpu_benchmark_script_runs_at_tiny_shapes_on_the_cpu():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_moe.py"), "--device", "cpu", "--smoke",
                          "--repeats", "1"], capture_output=True, text=True, timeout=600, check=True).stdout
    assert "| tiny | 4 | 2 |" in out and "| vmoe_mi4_every2_e8_k2 | 8 | 32 |" in out


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_nccl_fsdp_expert_parallel_training_equals_one_process(tmp_path):
    """`vmoe train --fsdp --expert-parallel` on 2 GPUs (NCCL, one GPU per
    process from LOCAL_RANK) logs the losses of one process on the whole
    batch, and its sharded checkpoint exports to from_pretrained."""
    import json
    import os
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import TINY
    sets = [a for o in TINY + ["train.steps=4", "train.checkpoint_every=2", "train.device=cuda"]
            for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def losses(cmd, wd, flags=()):
        subprocess.run(cmd + ["train", "--workdir", str(wd), *sets, *flags], env=env, check=True, timeout=600,
                       capture_output=True)
        with open(wd / "metrics.jsonl") as f:
            return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
    one = losses([sys.executable, "-m", "vmoe_torch.cli.main"], tmp_path / "one")
    two = losses([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                  "-m", "vmoe_torch.cli.main"], tmp_path / "two", ("--fsdp", "--expert-parallel"))
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, abs=1e-4), step
    assert (tmp_path / "two" / "checkpoints" / "step_00000004" / ".metadata").exists()
    import vmoe_torch
    vmoe_torch.from_pretrained(str(tmp_path / "two" / "final"))
