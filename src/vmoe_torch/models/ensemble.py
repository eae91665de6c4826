"""E^3 efficient ensembles (Allingham et al., arXiv 2110.03360): averaging
the members, and taking one member out as a plain V-MoE."""
from __future__ import annotations

import dataclasses

import torch

from .members import ensemble_log_probs
from .vit_moe import VisionTransformerMoe

__all__ = ["ensemble_log_probs", "extract_member"]


@torch.no_grad()
def extract_member(model: VisionTransformerMoe, member: int) -> VisionTransformerMoe:
    """Member `member` of an E^3 model as a plain V-MoE: its E/M experts,
    its rows of every router, groups of S/M tokens. It computes exactly the
    ensemble's rows b*M + member: members own disjoint experts, their
    capacity C = S*K*c/E = (S/M)*K*c/(E/M) is the same, and BPR's stable
    sort keeps their tokens' relative order."""
    cfg = model.config
    if cfg.moe is None or cfg.moe.ensemble_size == 1:
        raise ValueError("extract_member needs an E^3 model (moe.ensemble_size > 1).")
    m = cfg.moe.ensemble_size
    if not 0 <= member < m:
        raise ValueError(f"member must be in [0, {m}), got {member}.")
    per = cfg.moe.num_experts // m
    group = None if cfg.moe.group_size is None else cfg.moe.group_size // m
    sub = dataclasses.replace(cfg, moe=dataclasses.replace(
        cfg.moe, num_experts=per, group_size=group, ensemble_size=1))
    out = VisionTransformerMoe(sub)
    state = {}
    for name, value in model.state_dict().items():
        if ".mlp.router.weight" in name or ".mlp.experts." in name:
            value = value[member * per:(member + 1) * per]
        state[name] = value
    out.load_state_dict(state)
    return out.train(model.training)
