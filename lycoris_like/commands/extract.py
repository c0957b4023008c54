"""`lycoris-like extract`: (base, tuned) checkpoints → a LoRA/LoCon file by truncated SVD."""

from __future__ import annotations

import argparse

HELP = "extract a LoRA/LoCon from a fine-tuned checkpoint and its base (truncated SVD)"


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..cli import add_output, add_progress, add_rank_rule

    p = subparsers.add_parser(
        "extract", help=HELP,
        description="ΔW = tuned − base per layer, truncated SVD in float64; unchanged layers are skipped and the "
                    "relative error of each extracted layer is reported.")
    p.add_argument("base", help="base checkpoint (.safetensors, folder of shards or diffusers folder)")
    p.add_argument("tuned", help="fine-tuned checkpoint of the same model")
    add_output(p)
    add_rank_rule(p)
    p.add_argument("--prefix", help="name prefix for a single state dict (default: lora_unet for a UNet/DiT, lora_te for CLIP, else lycoris)")
    p.add_argument("--min-diff", type=float, default=0.0, help="also skip layers with ‖ΔW‖ ≤ MIN_DIFF·‖W‖ (default 0: only unchanged layers)")
    p.add_argument("--dtype", default="fp32", help="dtype of the factors (default fp32)")
    add_progress(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import check_output, rank_rules
    from ..tools.extract import extract

    out = check_output(args, [args.base, args.tuned])
    rule, conv_rule = rank_rules(args)
    result = extract(args.base, args.tuned, rule=rule, conv_rule=conv_rule, prefix=args.prefix,
                     dtype=args.dtype, min_diff=args.min_diff, progress=args.progress)
    print(result.table())
    print(f"{result.config['unchanged_layers']} unchanged layers skipped")
    result.save(out)
    worst = result.max_error
    print(f"wrote {out}: {sum(1 for r in result.rows if r.rank)} layers"
          + ("" if worst is None else f", largest relative error {worst:.3e}"))
    return 0
