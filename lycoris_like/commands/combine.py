"""`lycoris-like combine`: several adapter files with weights → one file."""

from __future__ import annotations

import argparse

HELP = "combine adapter files with weights into one (exact, dense diff, or SVD LoRA)"


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..cli import add_output, add_progress, add_rank_rule, weighted

    p = subparsers.add_parser(
        "combine", help=HELP,
        description="Combine adapter files. --to auto: each algorithm's own space where exact (LoRA concatenates "
                    "ranks, full/(IA)³/SVDiff add, SaRA adds ΔP), else a dense diff; --to diff: dense ΔW, exact; "
                    "--to lora: truncated SVD with the error reported per module.")
    p.add_argument("inputs", nargs="+", type=weighted, metavar="FILE[:WEIGHT]", help="adapter files, each with an optional weight (default 1)")
    add_output(p)
    p.add_argument("--to", choices=("auto", "native", "diff", "lora"), default="auto", help="how to combine (default: auto)")
    p.add_argument("--base", help="base model (safetensors file or diffusers folder): needed for (IA)³, DoRA, SVDiff, SaRA and LoHa/LoKr conv shapes in diff/lora output")
    p.add_argument("--dtype", help="tensor dtype of the output (fp32, fp16, bf16; default: the inputs')")
    add_rank_rule(p, required=False)
    add_progress(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import check_output, rank_rules
    from ..errors import ConfigError
    from ..tools.combine import combine

    out = check_output(args, [path for path, _ in args.inputs])
    rule, conv_rule = rank_rules(args, required=False)
    if args.to == "lora" and rule is None:
        raise ConfigError("--to lora needs --rank, --energy or --ratio")
    result = combine(args.inputs, to=args.to, rule=rule, conv_rule=conv_rule, base=args.base, dtype=args.dtype, progress=args.progress)
    print(result.table())
    result.save(out)
    worst = result.max_error
    print(f"wrote {out}: {len(result.tensors)} tensors, "
          + ("exact" if worst is None else f"largest relative error {worst:.3e}"))
    return 0
