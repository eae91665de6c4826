"""The model catalogue: one table, one name per model, the same name in
timm, and every entry building the config it always built."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmoe_torch.config.catalogue import CATALOGUE, RENAMED, resolve_config
from vmoe_torch.config.descriptions import parse_description
from vmoe_torch.config.typed import to_dict

SNAPSHOT = json.loads((Path(__file__).parents[1] / "fixtures" / "catalogue" / "configs.json").read_text())


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_every_entry_builds_its_recorded_config(name):
    assert to_dict(resolve_config(name)) == SNAPSHOT[name]


def test_the_catalogue_is_the_snapshot_and_old_names_map_into_it():
    assert set(CATALOGUE) == set(SNAPSHOT)
    assert set(RENAMED.values()) <= set(CATALOGUE)
    assert not set(RENAMED) & set(CATALOGUE)


@pytest.mark.parametrize("old", ["vit_mi4", "vmoe_mi4_every1", "soft_moe_mi4_half", "eee_s32_last2"])
def test_an_old_name_still_resolves_with_a_warning(old):
    with pytest.warns(DeprecationWarning, match=RENAMED[old]):
        cfg = resolve_config(old, num_classes=7)
    assert to_dict(cfg) == to_dict(resolve_config(RENAMED[old], num_classes=7))


def test_timm_registers_the_catalogue_names_themselves():
    pytest.importorskip("timm")
    from vmoe_torch.integrations.timm import timm_names
    names = timm_names()
    assert all(names[n] == n for n in CATALOGUE)


def test_soft_moe_description():
    cfg = parse_description("Soft MoE-B/16, E=128, p=1")
    assert cfg.moe is not None and cfg.moe.routing.router == "soft" and cfg.moe.routing.num_slots == 1
    assert (cfg.classifier, cfg.qk_norm, cfg.moe.layers) == ("gap", True, tuple(range(6, 12)))
    with pytest.raises(ValueError, match="p="):
        parse_description("Soft MoE-B/16, E=128")
