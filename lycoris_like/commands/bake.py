"""`lycoris-like bake`: merge adapter files into a base checkpoint."""

from __future__ import annotations

import argparse

HELP = "merge adapter files into a base checkpoint (file, shards or diffusers folder)"


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..cli import add_output, add_progress, weighted

    p = subparsers.add_parser(
        "bake", help=HELP,
        description="Merge adapters into a copy of the base: W + Σ m·ΔW computed in fp32, saved in the base's dtype, "
                    "one layer at a time; the same bits as AdapterNetwork.merge().")
    p.add_argument("base", help="base checkpoint: a .safetensors state dict (UNet, text encoder, or an SD/SDXL single file), a folder of shards, or a diffusers pipeline folder")
    p.add_argument("adapters", nargs="+", type=weighted, metavar="ADAPTER[:MULTIPLIER]", help="adapter files, each with an optional multiplier (default 1)")
    add_output(p, "checkpoint file (or folder for a folder base)")
    p.add_argument("--non-strict", dest="strict", action="store_false", help="leave out adapter modules that match no layer instead of failing")
    add_progress(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import check_output
    from ..tools.bake import bake

    out = check_output(args, [args.base, *(a for a, _ in args.adapters)])
    report = bake(args.base, args.adapters, out, strict=args.strict, overwrite=args.overwrite, progress=args.progress)
    print(report.summary())
    return 0
