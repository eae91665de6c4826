"""`vmoe` entry point: dispatches to one module per subcommand."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Optional, Sequence

from . import attack, budget, convert, models, serve, timm_cli, train_cli, upcycle
from .errors import EXPECTED, report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmoe", description="V-MoE (sparse Vision Mixture of Experts) in PyTorch.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an expected error (a bad input or state) too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (convert, models, upcycle, budget, serve, attack):
        module.add_parser(sub)
    train_cli.add_parsers(sub)
    timm_cli.add_parsers(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
    except EXPECTED as e:
        if args.debug and not _torchrun_worker():
            raise
        if args.debug:
            traceback.print_exc()
        report(args.command, e)
        return leave(2)
    except Exception:
        if not _torchrun_worker():
            raise
        traceback.print_exc()  # what an uncaught error prints, then the same exit as every path
        return leave(1)
    return leave(code)


def _torchrun_worker() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def leave(code: int) -> int:
    """`code`, for the caller to exit with. A torchrun worker has torn its
    process group down already (`train_cli`, on every path); it exits at
    once, success included, so that the interpreter's finalisation, which
    can still meet gloo's background threads and abort ("terminate called
    without an active exception", SIGABRT: seen about once in thirty
    refused runs, and once on a successful restart), does not turn a
    finished run or a clean refusal into a crash. Every file the command
    writes is closed before it returns; only the standard streams are
    flushed here."""
    if _torchrun_worker():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
