"""The `lycoris-like` command line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import AdapterError

COMMANDS = ("demo",)
"""Modules of `lycoris_like.commands`, in `--help` order."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lycoris-like", description="Adapters for diffusion models: train, inspect, combine, convert.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AdapterError as exc:
        print(f"lycoris-like: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
