"""Counter-based router noise (`vmoe_torch.moe.noise`): the hash is the
published triple32, draws do not depend on how groups are split between
calls (processes), they are standard normal, and a compiled MoE layer in
training draws them without recompiling when the seed changes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from vmoe_torch.moe import MoeMlp
from vmoe_torch.moe.noise import group_normal, hash32, seed_words


def _triple32(x: int) -> int:
    """Plain-integer triple32 (C. Wellons' hash prospector)."""
    x ^= x >> 17
    x = (x * 0xED5AD4BB) & 0xFFFFFFFF
    x ^= x >> 11
    x = (x * 0xAC4C1B51) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x31848BAB) & 0xFFFFFFFF
    return x ^ (x >> 14)


def test_hash_is_triple32_on_the_whole_32_bit_range():
    xs = torch.cat([torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1]),
                    torch.randint(0, 2**32, (2000,), generator=torch.Generator().manual_seed(0))])
    assert [int(h) for h in hash32(xs)] == [_triple32(int(x)) for x in xs]


def test_seed_words_take_any_python_int():
    assert seed_words(0).tolist() == [0, 0]
    assert seed_words(2**40 + 7).tolist() == [7, 2**8]
    assert seed_words(-1).tolist() == [2**32 - 1, 2**32 - 1]
    assert not torch.equal(group_normal(seed_words(2**64 + 3), 0, 1, (4,)), group_normal(seed_words(4), 0, 1, (4,)))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**63), st.integers(0, 10_000), st.integers(1, 12), st.data())
def test_a_group_draws_the_same_noise_whoever_draws_it(seed, first, groups, data):
    words = seed_words(seed)
    whole = group_normal(words, first, groups, (5, 3))
    cut = data.draw(st.integers(0, groups))
    parts = [group_normal(words, first, cut, (5, 3)), group_normal(words, first + cut, groups - cut, (5, 3))]
    assert torch.equal(whole, torch.cat(parts))


def test_each_draw_is_the_documented_function_of_seed_group_and_position():
    """Element i of group g is Box-Muller of H(gkey ^ H(2i)) and
    H(gkey ^ H(2i + 1)), computed here one element at a time in plain
    integers; the library's batched, cached form must give the same bits,
    on its first (uncached) call and on later (cached) ones."""
    seed, first, groups, shape = 2**37 + 11, 7, 3, (6, 4)
    key = _triple32(_triple32(seed & 0xFFFFFFFF) ^ (seed >> 32))
    u1, u2 = [], []
    for g in range(first, first + groups):
        gkey = _triple32(key ^ _triple32(g))
        for i in range(6 * 4):
            u1.append(_triple32(gkey ^ _triple32(2 * i)) >> 8)
            u2.append(_triple32(gkey ^ _triple32(2 * i + 1)) >> 8)
    to_unit = lambda bits: (torch.tensor(bits, dtype=torch.int64).to(torch.float32) + 0.5) * (2.0 ** -24)  # noqa: E731
    expected = torch.sqrt(-2.0 * torch.log(to_unit(u1))) * torch.cos((2.0 * np.pi) * to_unit(u2))
    for _ in range(2):
        got = group_normal(seed_words(seed), first, groups, shape)
        assert torch.equal(got, expected.view(groups, *shape))


def test_draws_are_standard_normal_and_independent():
    z = group_normal(seed_words(12345), 0, 500, (100, 8)).flatten().numpy().astype(np.float64)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert stats.kstest(z, "norm").pvalue > 1e-3
    other_seed = group_normal(seed_words(12346), 0, 500, (100, 8)).flatten().numpy()
    other_groups = group_normal(seed_words(12345), 500, 500, (100, 8)).flatten().numpy()
    for other in (other_seed, other_groups, np.roll(z, 1)):
        assert abs(np.corrcoef(z, other)[0, 1]) < 0.01


@pytest.mark.numerics
def test_layer_noise_follows_the_seed_and_the_rank_offset():
    torch.manual_seed(0)
    layer = MoeMlp(16, 32, 4, group_size=8, num_selected_experts=2).train()
    layer.noise_seed = 7
    x = torch.randn(4, 8, 16)  # 4 groups
    y, _ = layer(x)
    twin = MoeMlp(16, 32, 4, group_size=8, num_selected_experts=2).train()
    twin.load_state_dict(layer.state_dict())
    twin.noise_seed = 7
    twin.noise.shard = 1  # second of two ranks: global groups 2, 3
    y2, _ = twin(x[2:])
    # The same computation on half the batch: GEMMs of another size may block
    # (and round) differently on AVX2 / AVX-512 kernels, so equal to float32
    # rounding; the noise of the wrong groups moves the output far more.
    torch.testing.assert_close(y2, y[2:], rtol=1e-5, atol=1e-6)
    twin.noise.shard = 0  # the first rank's groups
    assert (twin(x[2:])[0] - y[2:]).abs().max() > 1e-3
    layer.noise_seed = 8
    assert not torch.equal(layer(x)[0], y)


@pytest.mark.slow
def test_compiled_layer_in_training_draws_on_device_without_recompiling():
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoeMlp(16, 32, 4, group_size=8, num_selected_experts=2).train()
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    x = torch.randn(6, 8, 16, requires_grad=True)
    for seed in (1, 2):
        layer.noise_seed = seed
        got, metrics = compiled(x)
        want, eager_metrics = layer(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(metrics["auxiliary_loss"], eager_metrics["auxiliary_loss"])
    got.sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, groups in ((3, 6), (4, 10)):
            layer.noise_seed = seed
            x = torch.randn(groups, 8, 16, requires_grad=True)
            torch.testing.assert_close(compiled(x)[0], layer(x)[0], rtol=1e-5, atol=1e-5)
