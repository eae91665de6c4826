"""`vmoe convert`: a reference (vmoe native) checkpoint -> safetensors + config.json."""
from __future__ import annotations

import argparse
import os
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a vmoe native checkpoint to safetensors",
        description="Reads PREFIX.index + PREFIX.data-* (no JAX needed), maps every array into "
                    "VisionTransformerMoe, and writes OUT_DIR/model.safetensors + config.json. "
                    "Load the result with vmoe_torch.from_pretrained(OUT_DIR).")
    p.add_argument("prefix", help="checkpoint prefix, e.g. /ckpts/vmoe_s32_last2_ilsvrc2012_randaug_light1")
    p.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="reference model kwargs as JSON (a file with "
                                      "'constructor_kwargs', or the plain kwargs)")
    src.add_argument("--preset", help="name of a released checkpoint (vmoe models --released)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resolution the position embedding is for (default: inferred)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="accept NaN/Inf weights (by default they are an error naming the array)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..convert import load_reference_config, model_from_reference
    from ..convert.released import RELEASED, released_config
    from ..utils.provenance import file_record

    if os.path.exists(args.out_dir) and not args.overwrite:
        raise FileExistsError(f"{args.out_dir!r} already exists; pass --overwrite to replace it.")
    if args.preset:
        kwargs = released_config(args.preset)
        image_size = args.image_size or RELEASED[args.preset].image_size
        source = {"kind": "converted", "reference_checkpoint": args.preset, "license": "apache-2.0"}
    else:
        kwargs = load_reference_config(args.config)
        image_size = args.image_size
        source = {"kind": "converted", "reference_config": file_record(args.config)}
    start = time.perf_counter()
    model = model_from_reference(args.prefix, kwargs, image_size, allow_nonfinite=args.allow_nonfinite)
    source["reference_prefix"] = file_record(args.prefix)
    model.save_pretrained(args.out_dir, overwrite=args.overwrite, source=source)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {n:,} parameters in {time.perf_counter() - start:.1f}s -> {args.out_dir}")
    return 0
