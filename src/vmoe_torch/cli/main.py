"""`vmoe` entry point: dispatches to one module per subcommand."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from . import budget, convert, models, serve, timm_cli, train_cli, upcycle
from .errors import EXPECTED, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmoe", description="V-MoE (sparse Vision Mixture of Experts) in PyTorch.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an expected error (a bad input or state) too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (convert, models, upcycle, budget, serve):
        module.add_parser(sub)
    train_cli.add_parsers(sub)
    timm_cli.add_parsers(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EXPECTED as e:
        if args.debug:
            raise
        report(args.command, e)
        return leave(2)


def leave(code: int) -> int:
    """`code`, for the caller to exit with. A torchrun worker that failed has
    torn its process group down already (`train_cli`); it exits at once, so
    that the interpreter's finalisation, which can still meet gloo's
    background threads and abort ("terminate called without an active
    exception", SIGABRT: seen once in about thirty refused runs), does
    not turn a clean refusal into a crash."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
