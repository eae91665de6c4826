"""`vmoe timm-train`, `vmoe timm-validate` (timm's components) and
`vmoe export-digits` (the bundled digits as an ImageFolder tree)."""
from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ..integrations import timm_scripts
    timm_scripts.add_parsers(sub)
    p = sub.add_parser("export-digits", help="write the bundled digits as ImageFolder PNGs (train/, validation/)")
    p.add_argument("out_dir")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=export_digits)


def export_digits(args: argparse.Namespace) -> int:
    from ..data.digits import export_image_folder
    counts = export_image_folder(args.out_dir, seed=args.seed, image_size=args.image_size,
                                 overwrite=args.overwrite)
    print(f"wrote {args.out_dir}: " + ", ".join(f"{k} {v} images" for k, v in counts.items()))
    return 0
