"""`vmoe` entry point: dispatches to one module per subcommand."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ..utils.errors import RunRefused
from . import convert, models, timm_cli, train_cli, upcycle


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmoe", description="V-MoE (sparse Vision Mixture of Experts) in PyTorch.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an expected error (a bad input or state) too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (convert, models, upcycle):
        module.add_parser(sub)
    train_cli.add_parsers(sub)
    timm_cli.add_parsers(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError, RunRefused) as e:
        if args.debug:
            raise
        # Under torchrun every rank meets the same bad input: one report, from rank 0.
        if os.environ.get("RANK", "0") == "0":
            print(f"vmoe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
