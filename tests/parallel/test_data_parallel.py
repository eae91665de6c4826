"""Data parallelism: each rank draws the router noise of its own routing
groups (rank offset), so W ranks route as one process on the whole batch."""
from __future__ import annotations

import copy

import pytest
import torch

from vmoe_torch import create_model


@pytest.mark.numerics
def test_rank_offset_gives_each_rank_the_noise_of_its_own_groups():
    torch.manual_seed(0)
    model = create_model("vmoe_mi4_every1_e8_k2", num_layers=2, layers=(0, 1), patch_size=8, image_size=32,
                         group_size=2 * 17).train()
    torch.nn.init.normal_(model.head.weight)  # the zero-initialised head would hide any difference
    model.set_noise_seed(5)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        ranks = []
        for rank in range(2):  # what data_parallel() sets on rank r of 2
            replica = copy.deepcopy(model)
            for layer in replica.moe_layers().values():
                layer.noise.shard = rank
            ranks.append(replica(x[rank * 4:(rank + 1) * 4]))
        same_noise = copy.deepcopy(model)  # the old behaviour: every rank at offset 0
        stale = same_noise(x[4:])
    # Each rank computes on its own 4 images: GEMMs of another size may round
    # differently (AVX2 / AVX-512 kernels), so equal to float32 rounding;
    # the noise of the wrong groups moves the logits far more.
    torch.testing.assert_close(torch.cat(ranks), full, rtol=1e-5, atol=1e-5)
    assert (stale - full[4:]).abs().max() > 1e-3


def test_misaligned_groups_warn(tmp_path):
    from helpers import TINY

    from vmoe_torch.config import load_config
    from vmoe_torch.train.trainer import Trainer
    cfg = load_config(None, TINY + ["train.steps=1", "train.grad_accum=4"])  # 4 images = 68 tokens; group 34 ok
    with pytest.warns(UserWarning, match="not a multiple of group_size"):
        Trainer(load_config(None, TINY + ["train.steps=1", "data.batch_size=12", "train.grad_accum=4"]),
                str(tmp_path / "b")).fit()  # 3 images = 51 tokens per micro-batch
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Trainer(cfg, str(tmp_path / "a")).fit()


def test_local_device_takes_the_gpu_of_the_local_rank_or_says_why_not(monkeypatch):
    from vmoe_torch.distributed.runtime import local_device
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device(torch.device("cpu")) == torch.device("cpu")
    assert local_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # an explicit index is kept
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="LOCAL_RANK=3 but this node has 2 GPUs"):
        local_device(torch.device("cuda"))
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device(torch.device("cuda")) == torch.device("cuda", 1) and chosen == [1]
