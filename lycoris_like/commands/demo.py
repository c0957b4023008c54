"""`lycoris-like demo`: the README's first command."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="train, save, reload and merge an adapter on a small UNet (no downloads)")
    demo.add_argument("--algo", default="lora", help="algorithm to train (default: lora)")
    demo.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    demo.add_argument("--dim", type=int, default=4, help="rank (default: 4)")
    demo.add_argument("--alpha", type=float, default=2.0, help="alpha (default: 2)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    demo.add_argument("--out", default="demo_out", help="folder for the saved adapter (default: demo_out)")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..demo import run as run_demo

    torch.set_num_threads(args.threads)
    result = run_demo(algo=args.algo, steps=args.steps, out_dir=args.out, dim=args.dim, alpha=args.alpha, seed=args.seed)
    ok = result.unmerge_exact and result.reload_max_diff == 0.0 and result.losses[-1][1] < result.losses[0][1]
    print("demo check:", "OK" if ok else "FAILED")
    return 0 if ok else 1
