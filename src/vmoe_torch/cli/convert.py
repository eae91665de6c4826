"""`vmoe convert`: a reference (vmoe native) checkpoint -> safetensors +
config.json; `vmoe export-native`: the other way, for the reference's code."""
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
    add_export_parser(sub)


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-native", help="write a model in vmoe's native checkpoint format",
        description="Writes MODEL (a from_pretrained directory) as OUT_DIR/ckpt.index + "
                    "OUT_DIR/ckpt.data-* (readable by vmoe.checkpoints.partitioned.restore_checkpoint) "
                    "and OUT_DIR/config.json (the reference's model_class and constructor_kwargs). "
                    "Settings the reference cannot express are refused before anything is written; "
                    "OUT_DIR appears complete or not at all.")
    p.add_argument("model", help="a from_pretrained directory (vmoe consolidate / upcycle / convert output)")
    p.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--num-shards", type=int, default=1, help="data files (ckpt.data-0000K-of-N)")
    p.add_argument("--max-chunk-mb", type=float, default=None, help="split larger arrays into chunks")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--allow-nonfinite", action="store_true", help="write NaN/Inf weights (refused by default)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    import json

    from ..convert import model_to_reference
    from ..convert.reference_config import config_to_reference
    from ..models import VisionTransformerMoe
    from ..utils.io import atomic_directory

    if args.num_shards < 1:
        raise ValueError(f"--num-shards must be >= 1, got {args.num_shards}.")
    if os.path.exists(args.out_dir) and not args.overwrite:
        raise FileExistsError(f"{args.out_dir!r} already exists; pass --overwrite to replace it.")
    model = VisionTransformerMoe.from_pretrained(args.model)
    kwargs = config_to_reference(model.config)  # refuses before the output directory exists
    chunk = int(args.max_chunk_mb * 2**20) if args.max_chunk_mb else None
    with atomic_directory(args.out_dir, args.overwrite) as tmp:
        model_to_reference(model, os.path.join(tmp, "ckpt"), num_shards=args.num_shards,
                           max_chunk_bytes=chunk, allow_nonfinite=args.allow_nonfinite)
        name = kwargs.pop("name")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"model_class": name, "constructor_kwargs": kwargs}, f, indent=2)
    print(f"wrote {args.out_dir}/ckpt ({args.num_shards} data file(s)) and config.json ({name})")
    return 0


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
