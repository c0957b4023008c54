"""`lycoris-like inspect`: modules, ranks, scales, ‖ΔW‖ and metadata of an adapter file."""

from __future__ import annotations

import argparse
import json

HELP = "show an adapter file's modules (algorithm, rank, alpha, scale, ‖ΔW‖, dtype) and metadata"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help=HELP,
                              description="Show what an adapter file holds. ‖ΔW‖ of (IA)³, DoRA, SVDiff and SaRA needs --base.")
    p.add_argument("file", help="adapter .safetensors file")
    p.add_argument("--base", help="base model (safetensors file or diffusers folder) for weight-dependent ΔW and exact layer shapes")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--no-norms", dest="norms", action="store_false", help="skip computing ‖ΔW‖ (faster on big files)")
    p.add_argument("--full-metadata", action="store_true", help="print long metadata values in full")
    from ..cli import add_progress

    add_progress(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..tools.inspect import inspect_file

    info = inspect_file(args.file, base=args.base, norms=args.norms, progress=args.progress)
    if args.json:
        print(json.dumps(info.as_dict(), indent=2, sort_keys=True))
        return 0
    print(info.summary())
    print()
    print("metadata:" if info.metadata else "metadata: (none)")
    for key in sorted(info.metadata):
        value = info.metadata[key]
        if not args.full_metadata and len(value) > 100:
            value = value[:97] + "..."
        print(f"  {key}: {value}")
    print()
    print(info.table())
    return 0
