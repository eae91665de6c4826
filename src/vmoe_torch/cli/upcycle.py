"""`vmoe upcycle`: a dense ViT (timm, torchvision, Hugging Face, vit_jax,
vmoe native or ours) -> an upcycled V-MoE in the from_pretrained format."""
from __future__ import annotations

import argparse
import os
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..upcycling import FORMATS, NORMALIZATIONS
    p = sub.add_parser(
        "upcycle", help="sparse-upcycle a dense ViT checkpoint into a V-MoE",
        description="Reads SOURCE (a .safetensors/.bin/.pth file, a Hugging Face directory, a "
                    "vit_jax .npz, a vmoe native prefix or a from_pretrained directory), copies "
                    "each MoE block's dense MLP into all its experts, initialises the routers, "
                    "and writes OUT_DIR (model.safetensors, config.json, README.md) atomically.")
    p.add_argument("source")
    p.add_argument("out_dir")
    p.add_argument("--from", dest="source_format", choices=FORMATS, default=None,
                   help="the source's library (default: detected from the key layout)")
    p.add_argument("--model", required=True,
                   help="the MoE part: 'E=8, K=2, Every 2' (placement: Every n, Last n, Second half, "
                        "Layers i j; M=2 for E^3; p=1 for Soft MoE); the backbone is read from SOURCE")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (fused-qkv sources)")
    p.add_argument("--image-size", type=int, default=None, help="resolution of the position embedding")
    p.add_argument("--normalization", choices=sorted(NORMALIZATIONS), default=None,
                   help="the source's input normalisation by name, when SOURCE does not record it")
    p.add_argument("--mean", type=_floats, default=None, help="the source's input mean, e.g. 0.485,0.456,0.406")
    p.add_argument("--std", type=_floats, default=None, help="the source's input std, e.g. 0.229,0.224,0.225")
    p.add_argument("--classifier", choices=("token", "gap"), default=None, help="vit_jax sources only")
    p.add_argument("--config", default=None, help="reference kwargs JSON for a vmoe native source")
    p.add_argument("--num-classes", type=int, default=None, help="a new, zero-initialised head")
    p.add_argument("--noise-std", type=float, default=0.0,
                   help="per-expert noise, relative to each weight's rms (breaks expert symmetry)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--router", choices=("top_experts", "expert_choice", "soft"), default=None)
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--num-slots", type=int, default=None, help="Soft MoE slots per expert")
    p.add_argument("--batch-priority", action="store_true", help="Batch Priority Routing")
    p.add_argument("--group-size", type=int, default=None, help="tokens per routing group")
    p.add_argument("--bfloat16-dispatch", action=argparse.BooleanOptionalAction, default=False,
                   help="bfloat16 dispatch, as in the paper (default: float32, so that K=E computes "
                        "the dense model exactly)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from e


def run(args: argparse.Namespace) -> int:
    from ..convert.reference import load_reference_config
    from ..upcycling import read_dense, upcycle
    from ..utils.provenance import file_record

    if os.path.exists(args.out_dir) and not args.overwrite:
        raise FileExistsError(f"{args.out_dir!r} already exists; pass --overwrite to replace it.")
    routing: dict[str, Any] = {}
    if args.router:
        routing["router"] = args.router
    if args.capacity_factor is not None:
        routing["capacity_factor"] = args.capacity_factor
    if args.num_slots is not None:
        routing["num_slots"] = args.num_slots
    if args.batch_priority:
        routing["batch_priority"] = True
    routing["bfloat16_dispatch"] = args.bfloat16_dispatch
    read = dict(num_heads=args.num_heads, image_size=args.image_size, classifier=args.classifier,
                mean=args.mean, std=args.std, normalization=args.normalization,
                reference_config=load_reference_config(args.config) if args.config else None)
    src = read_dense(args.source, args.source_format, **read)  # fails here, before any write
    model = upcycle(src, args.model, noise_std=args.noise_std, seed=args.seed,
                    num_classes=args.num_classes, group_size=args.group_size, **routing)
    source = {"kind": "upcycled", "from": args.source_format or src.description.split()[0],
              **file_record(args.source), "model": args.model, "noise_std": args.noise_std,
              "seed": args.seed, "notes": src.notes}
    model.save_pretrained(args.out_dir, overwrite=args.overwrite, source=source)
    moe = model.config.moe
    assert moe is not None
    print(f"upcycled {args.source} -> {args.out_dir}: E={moe.num_experts} in blocks {list(moe.layers)}")
    return 0
