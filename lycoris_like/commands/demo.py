"""`lycoris-like demo`: the README's first command."""

from __future__ import annotations

import argparse
import functools

HELP = "train, save, reload and merge an adapter on a small UNet (no downloads)"


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..demo import BATCH, DEFAULT_ALGO, DEFAULT_STEPS

    demo = subparsers.add_parser(
        "demo",
        help=HELP,
        description=(
            "Fine-tune a small diffusers UNet (built from a config) on images generated in code, for "
            "noise prediction; save the adapter, reload it into a fresh UNet, merge and unmerge it, and "
            "check each step. Writes the adapter files and a loss-curve PNG to --out and prints a summary table."
        ),
    )
    demo.add_argument("--algo", default=DEFAULT_ALGO,
                      help=f"algorithm to train, a comma-separated list, or 'all' for every registered one (default: {DEFAULT_ALGO})")
    demo.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps per algorithm (default: {DEFAULT_STEPS})")
    demo.add_argument("--dim", type=int, default=None, help="rank (default: the algorithm's demo setting, 4)")
    demo.add_argument("--alpha", type=float, default=None, help="alpha (default: the algorithm's demo setting, 2)")
    demo.add_argument("--lr", type=float, default=None,
                      help="learning rate for every parameter (default: per algorithm, and the rates SVDiff "
                           "and SaRA recommend for their parameters)")
    demo.add_argument("--batch", type=int, default=BATCH, help=f"images per step (default: {BATCH})")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads (default: 1 — the tensors are small, and on a shared machine "
                           "more threads can make it several times slower)")
    demo.add_argument("--out", default="demo_out", help="folder for the adapters and the loss curve (default: demo_out)")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bar on stderr (default: when stderr is a terminal)")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .. import demo
    from ..errors import ConfigError
    from ..plot import INSTALL, available, plot_losses

    algos = demo.parse_algos(args.algo)  # unknown names fail here, before any work
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if not available():
        raise ConfigError(f"the demo draws its loss curves with matplotlib, which is not installed: {INSTALL}")
    torch.set_num_threads(args.threads)
    say = functools.partial(print, flush=True)  # each line at once: a piped run shows every stage as it ends
    results = []
    for i, algo in enumerate(algos, 1):
        stage = f"[{i}/{len(algos)}] " if len(algos) > 1 else ""
        results.append(demo.run(algo, args.steps, args.out, dim=args.dim, alpha=args.alpha, seed=args.seed,
                                log=lambda line, stage=stage: say(stage + line), lr=args.lr, batch=args.batch,
                                progress=args.progress, verbose=len(algos) == 1))
    say()
    say(demo.summary_table(results))
    name = algos[0] if len(algos) == 1 else "all"
    png = plot_losses({r.algo: r.losses for r in results}, Path(args.out) / f"loss_{name}.png")
    say(f"loss curve: {png}")
    ok = all(r.ok for r in results)
    say("demo check:", "OK" if ok else "FAILED")
    return 0 if ok else 1
