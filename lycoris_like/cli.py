"""The `lycoris-like` command line."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import AdapterError, ConfigError

COMMANDS = ("inspect", "combine", "bake", "extract", "resize", "convert", "demo")
"""Modules of `lycoris_like.commands`, in `--help` order."""

BAD_INPUT = (AdapterError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
"""Errors that mean the input was wrong: a message and exit code 2, no traceback."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser. With `command`, only that subcommand's options are built and the others get
    their one-line help, so `--help` and the light commands never import what heavy ones need."""
    parser = argparse.ArgumentParser(prog="lycoris-like", description="Adapters for diffusion models: train, inspect, combine, convert.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f".commands.{name}", __package__)
        if command is None or name == command:
            module.register(sub)
        else:
            sub.add_parser(name, help=module.HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")  # top-level options take no values
    args = build_parser(command).parse_args(argv)
    try:
        return args.func(args)
    except BAD_INPUT as exc:
        message = exc.strerror + f": {exc.filename}" if isinstance(exc, OSError) and exc.filename and exc.strerror else str(exc)
        print(f"lycoris-like {args.command}: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lycoris-like inspect … | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"lycoris-like {args.command}: interrupted; no output was written", file=sys.stderr)
        return 130


# ------------------------------------------------------------------ helpers the subcommands share


def weighted(text: str) -> tuple[str, float]:
    """`FILE` or `FILE:WEIGHT`: what follows the last colon is the weight, unless the whole text
    names an existing file or that part is a path (`C:\\x`, `dir:x/y`)."""
    path, sep, tail = text.rpartition(":")
    if not sep or not path or Path(text).exists() or "/" in tail or "\\" in tail:
        return text, 1.0
    try:
        value = float(tail)
    except ValueError:
        raise argparse.ArgumentTypeError(f"malformed multiplier {tail!r} in {text!r}: expected FILE or FILE:NUMBER, e.g. {path}:0.8") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"multiplier must be finite in {text!r}")
    return path, value


def add_output(parser: argparse.ArgumentParser, what: str = "file") -> None:
    parser.add_argument("-o", "--output", required=True, help=f"the {what} to write (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def add_progress(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--progress", dest="progress", action="store_true", default=None, help="always draw a progress bar on stderr")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="never draw one (default: only on a terminal)")


def add_rank_rule(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_argument_group("rank rule" + ("" if required else " (for --to lora)"))
    g.add_argument("--rank", type=int, help="keep this rank (with --energy/--ratio: the largest rank allowed)")
    g.add_argument("--energy", type=float, help="keep the smallest rank holding this fraction of ‖ΔW‖² (0 < e ≤ 1)")
    g.add_argument("--ratio", type=float, help="keep singular values ≥ σ_max / RATIO")
    g.add_argument("--conv-rank", type=int, help="rank cap for convolutions with kernel > 1 (default: as --rank)")
    g.add_argument("--conv-energy", type=float, help="energy for convolutions with kernel > 1")
    g.add_argument("--conv-ratio", type=float, help="ratio for convolutions with kernel > 1")


def rank_rules(args: argparse.Namespace, required: bool = True) -> tuple[Any, Any]:
    from .tools.svd import RankRule

    if args.rank is None and args.energy is None and args.ratio is None:
        if required:
            raise ConfigError("give --rank, --energy or --ratio")
        return None, None
    rule = RankRule(args.rank, args.energy, args.ratio)
    conv = None
    if args.conv_rank is not None or args.conv_energy is not None or args.conv_ratio is not None:
        conv = RankRule(args.conv_rank, args.conv_energy, args.conv_ratio)
    return rule, conv


def check_output(args: argparse.Namespace, inputs: Sequence[str] = ()) -> Path:
    """Refuse before any work: an existing output without --overwrite, a missing folder, or an
    output that is one of the inputs (it would be replaced while being read)."""
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"folder does not exist: {out.parent}")
    if any(Path(i).exists() and Path(i).resolve() == out.resolve() for i in inputs):
        raise ConfigError(f"{out} is also an input; write to another path")
    return out


if __name__ == "__main__":
    sys.exit(main())
