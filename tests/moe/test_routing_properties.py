"""Hypothesis property tests of the routing invariants."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmoe_torch.moe import top_experts_per_item


@st.composite
def routing_case(draw):
    groups = draw(st.integers(1, 3))
    size = draw(st.integers(1, 40))
    experts = draw(st.integers(1, 9))
    k = draw(st.integers(1, experts))
    capacity = draw(st.integers(1, size))
    bpr = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    tied = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(groups, size, experts, generator=gen) * 2
    if tied:  # integer logits: many equal gates within and across rows
        logits = logits.round().clamp(-1, 1)
    return torch.softmax(logits, -1), k, capacity, bpr


COMMON = settings(max_examples=150, deadline=None)


@COMMON
@given(routing_case())
def test_buffers_never_exceed_capacity_and_slots_unique(case):
    gates, k, capacity, bpr = case
    r = top_experts_per_item(gates, k, capacity, bpr)
    for g in range(gates.shape[0]):
        kept = r.kept[g]
        slots = list(zip(r.expert_index[g][kept].tolist(), r.buffer_index[g][kept].tolist()))
        assert len(slots) == len(set(slots))              # one token per slot
        assert all(0 <= c < capacity for _, c in slots)
        load = torch.bincount(r.expert_index[g][kept], minlength=gates.shape[2])
        assert int(load.max()) <= capacity


@COMMON
@given(routing_case())
def test_at_most_k_distinct_experts_with_descending_gates(case):
    gates, k, capacity, bpr = case
    r = top_experts_per_item(gates, k, capacity, bpr)
    assert r.expert_index.shape[-1] == k
    for row in r.expert_index.reshape(-1, k).tolist():
        assert len(set(row)) == k
    w = r.combine_weights
    assert bool((w[..., :-1] >= w[..., 1:]).all())
    torch.testing.assert_close(w, gates.gather(-1, r.expert_index))


@COMMON
@given(routing_case())
def test_vanilla_keeps_earliest_tokens(case):
    gates, k, capacity, _ = case
    r = top_experts_per_item(gates, k, capacity, batch_priority=False)
    for g in range(gates.shape[0]):
        for choice in range(k):
            e, kept = r.expert_index[g, :, choice], r.kept[g, :, choice]
            for expert in e.unique().tolist():
                mask = e == expert
                flags = kept[mask].tolist()
                # Within one expert and choice rank, kept tokens precede dropped ones.
                assert flags == sorted(flags, reverse=True)


@COMMON
@given(routing_case())
def test_bpr_keeps_highest_priority_tokens(case):
    gates, k, capacity, _ = case
    r = top_experts_per_item(gates, k, capacity, batch_priority=True)
    top = r.combine_weights[..., 0]
    for g in range(gates.shape[0]):
        for choice in range(k):
            e, kept = r.expert_index[g, :, choice], r.kept[g, :, choice]
            for expert in e.unique().tolist():
                mask = e == expert
                if kept[mask].all() or not kept[mask].any():
                    continue
                assert float(top[g][mask & kept].min()) >= float(top[g][mask & ~kept].max())


@COMMON
@given(routing_case())
def test_top1_choices_never_displaced_by_top2(case):
    gates, k, capacity, bpr = case
    r = top_experts_per_item(gates, k, capacity, bpr)
    if k < 2:
        return
    for g in range(gates.shape[0]):
        first_e, first_kept = r.expert_index[g, :, 0], r.kept[g, :, 0]
        later_kept = r.kept[g, :, 1:]
        later_e = r.expert_index[g, :, 1:]
        for expert in range(gates.shape[2]):
            dropped_top1 = bool((~first_kept & (first_e == expert)).any())
            if dropped_top1:  # the buffer filled with top-1 choices: no top-2 got in
                assert not bool((later_kept & (later_e == expert)).any())
        # Every top-1 choice sits before every later choice in its expert's buffer.
        for expert in range(gates.shape[2]):
            b1 = r.buffer_index[g, :, 0][first_e == expert]
            b2 = r.buffer_index[g, :, 1:][later_e == expert]
            if len(b1) and len(b2):
                assert int(b1.max()) < int(b2.min())


@COMMON
@given(routing_case())
def test_buffer_positions_are_a_prefix(case):
    """Per expert, the positions handed out are 0..n-1 with no gaps."""
    gates, k, capacity, bpr = case
    r = top_experts_per_item(gates, k, capacity, bpr)
    for g in range(gates.shape[0]):
        for expert in range(gates.shape[2]):
            pos = sorted(r.buffer_index[g][r.expert_index[g] == expert].tolist())
            assert pos == list(range(len(pos)))
