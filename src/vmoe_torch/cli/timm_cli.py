"""`vmoe timm-train`, `vmoe timm-validate` (timm's components), `vmoe
timm-run` (timm's own scripts with our models registered) and `vmoe
export-digits` (the bundled digits as an ImageFolder tree)."""
from __future__ import annotations

import argparse
import os
import runpy
import sys


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ..integrations import timm_scripts
    timm_scripts.add_parsers(sub)
    p = sub.add_parser("export-digits", help="write the bundled digits as ImageFolder PNGs (train/, validation/)")
    p.add_argument("out_dir")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=export_digits)
    r = sub.add_parser("timm-run", help="run a script of timm's repository (validate.py, benchmark.py, "
                                        "train.py, ...) with the vmoe-torch models registered",
                       description="Runs SCRIPT as `python SCRIPT ARGS...` after registering our "
                                   "models with timm, for scripts without --device-modules.")
    r.add_argument("script", help="path to the script, e.g. pytorch-image-models/validate.py")
    r.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")
    r.set_defaults(func=timm_run)


def timm_run(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.script):
        raise FileNotFoundError(f"{args.script!r} is not a file: pass the path of a script of timm's "
                                "repository (validate.py, benchmark.py, train.py).")
    try:
        import timm  # noqa: F401 - importing timm registers our models (vmoe_torch's import hook)
    except ImportError as err:
        raise ValueError("timm-run needs timm: pip install 'vmoe-torch[timm]'.") from err
    sys.argv = [args.script, *args.script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def export_digits(args: argparse.Namespace) -> int:
    from ..data.digits import export_image_folder
    counts = export_image_folder(args.out_dir, seed=args.seed, image_size=args.image_size,
                                 overwrite=args.overwrite)
    print(f"wrote {args.out_dir}: " + ", ".join(f"{k} {v} images" for k, v in counts.items()))
    return 0
