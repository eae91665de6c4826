"""`vmoe models`: list model presets and released checkpoints."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model presets and released checkpoints")
    p.add_argument("--released", action="store_true", help="list Google's released checkpoints")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.released:
        from ..convert.released import RELEASED
        for c in RELEASED.values():
            acc = ", ".join(f"{k} {v}%" for k, v in c.expected.items()) or "-"
            flag = "" if c.supported else "  [not supported yet: " + c.note + "]"
            members = f", E^3 M={c.ensemble_size}" if c.ensemble_size > 1 else ""
            print(f"{c.name}\n    {c.description}{members} @ {c.image_size}px, {c.num_classes} classes; "
                  f"{acc}{flag}")
        return 0
    from ..models import list_models, resolve_config
    for name in list_models():
        cfg = resolve_config(name)
        moe = "dense"
        if cfg.moe is not None:
            r = cfg.moe.routing
            how = (f"soft p={r.num_slots}" if r.router == "soft" else
                   f"{r.router} K={r.num_selected_experts}")
            members = f" M={cfg.moe.ensemble_size}" if cfg.moe.ensemble_size > 1 else ""
            moe = f"E={cfg.moe.num_experts} {how}{members} layers={list(cfg.moe.layers)}"
        print(f"{name:22s} D={cfg.hidden_size} L={cfg.num_layers} patch={cfg.patch_size[0]} "
              f"{cfg.image_size[0]}px {moe}")
    return 0
