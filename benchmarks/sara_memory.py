"""Peak memory of SaRA vs LoRA vs dense masked fine-tuning for a few AdamW steps (not a timed test).

    python benchmarks/sara_memory.py                # SD1.5-config UNet, random weights
    python benchmarks/sara_memory.py --quick        # half width (block_out_channels 160…640)
    python benchmarks/sara_memory.py --only sara,lora --steps 3 --threshold 2e-3

Each configuration runs in its own subprocess, so its max RSS (`ru_maxrss`) is its own; the
parent prints a Markdown table. Configurations (all on the same UNet, input latent (1,4,32,32),
t = 10, context (1,77,768), loss = mean squared output):

- `frozen`  — the floor: the UNet, a forward and a backward to the input, no optimizer;
- `sara`    — `create_network(algo="sara", threshold=θ)` (Linear/Conv weights), AdamW;
- `lora`    — `create_network(algo="lora", dim=…)` on the same layers, AdamW;
- `dense`   — dense masked fine-tuning: every Linear/Conv weight trainable, dense AdamW, the
              gradient multiplied by the 1-byte bool mask |P₀| < θ before each step (what SaRA
              trains, done the plain way: dense gradients and dense Adam moments).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from configs import build_unet  # noqa: E402  (benchmarks/ is not a package)

ROOT = HERE.parent
CONFIGS = ("frozen", "sara", "lora", "dense")


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def worker(name: str, quick: bool, steps: int, threshold: float, lora_dim: int) -> dict:
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(2)
    unet = build_unet(quick).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    sample, t, context = torch.randn(1, 4, 32, 32, generator=g), torch.tensor([10]), torch.randn(1, 77, 768, generator=g)
    model_gib = rss_gib()
    hosts = [m for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    masks: list[tuple[torch.Tensor, torch.Tensor]] = []
    optimizer = None
    if name == "frozen":
        sample.requires_grad_(True)
        trainable = 0
    elif name == "sara":
        import lycoris_like.modules.sara  # noqa: F401
        from lycoris_like import create_network

        net = create_network(unet, algo="sara", threshold=threshold)
        optimizer = torch.optim.AdamW(net.param_groups())
        trainable = sum(p.numel() for p in net.parameters())
    elif name == "lora":
        from lycoris_like import create_network

        net = create_network(unet, algo="lora", dim=lora_dim, alpha=lora_dim)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        trainable = sum(p.numel() for p in net.parameters())
    elif name == "dense":
        for m in hosts:
            m.weight.requires_grad_(True)
            masks.append((m.weight, m.weight.detach().abs() < threshold))  # 1-byte bools, as the official code
        optimizer = torch.optim.AdamW([w for w, _ in masks], lr=1e-3, weight_decay=0.0)
        trainable = sum(int(mask.sum()) for _, mask in masks)
    else:
        raise SystemExit(f"unknown configuration {name!r}")
    setup_gib = rss_gib()
    times = []
    unet.train()
    for _ in range(steps):
        start = time.perf_counter()
        loss = unet(sample, t, context).sample.square().mean()
        loss.backward()
        for weight, mask in masks:
            weight.grad.mul_(mask)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {
        "config": name, "trainable": trainable, "model_gib": model_gib, "setup_gib": setup_gib,
        "peak_gib": rss_gib(), "step_s": sorted(times)[len(times) // 2],
        "unet_params": sum(p.numel() for p in unet.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="half-width UNet")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=2e-3)
    parser.add_argument("--lora-dim", type=int, default=16)
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick, args.steps, args.threshold, args.lora_dim)))
        return
    rows = []
    for name in args.only.split(","):
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--threshold", str(args.threshold),
               "--lora-dim", str(args.lora_dim)] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    if not rows:
        return
    floor = next((r["peak_gib"] for r in rows if r["config"] == "frozen"), None)
    width = "half width (--quick)" if args.quick else "SD1.5 width"
    print(f"\nUNet {width}: {rows[0]['unet_params']:,} parameters; θ = {args.threshold:g}; {args.steps} AdamW steps\n")
    print("| configuration | trainable | peak RSS (GiB) | above the frozen floor (GiB) | median step (s) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        above = f"{r['peak_gib'] - floor:.2f}" if floor is not None else "—"
        label = {"frozen": "frozen UNet (floor)", "sara": f"SaRA θ={args.threshold:g}", "lora": f"LoRA dim {args.lora_dim}",
                 "dense": f"dense masked (θ={args.threshold:g})"}[r["config"]]
        print(f"| {label} | {r['trainable']:,} | {r['peak_gib']:.2f} | {above} | {r['step_s']:.1f} |")


if __name__ == "__main__":
    main()
