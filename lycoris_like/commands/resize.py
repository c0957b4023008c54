"""`lycoris-like resize`: change the rank of a LoRA/LoCon file."""

from __future__ import annotations

import argparse

HELP = "change the rank of a LoRA/LoCon file (SVD; same rank rules as extract)"


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..cli import add_output, add_progress, add_rank_rule

    p = subparsers.add_parser(
        "resize", help=HELP,
        description="SVD of each module's ΔW from its factors; modules already at or below the chosen rank are "
                    "copied bit-exactly; the scale alpha/rank of each module is kept.")
    p.add_argument("file", help="LoRA/LoCon .safetensors file")
    add_output(p)
    add_rank_rule(p)
    p.add_argument("--dtype", help="dtype of new factors (default: the file's)")
    add_progress(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import check_output, rank_rules
    from ..tools.resize import resize

    out = check_output(args, [args.file])
    rule, conv_rule = rank_rules(args)
    result = resize(args.file, rule=rule, conv_rule=conv_rule, dtype=args.dtype, progress=args.progress)
    print(result.table())
    result.save(out)
    worst = result.max_error
    print(f"wrote {out}" + ("" if worst is None else f", largest relative error {worst:.3e}"))
    return 0
