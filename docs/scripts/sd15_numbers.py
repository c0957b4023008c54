"""Measure adapter sizes on the SD1.5 UNet config (random weights) for the docs.

Run: python docs/scripts/sd15_numbers.py   (≈ 30 s, 3.5 GB RAM; downloads nothing)
"""

import sys
import tempfile
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from lycoris_like import create_network

SD15 = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


def main(configs: list[tuple[str, dict]]) -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15)
    print("| configuration | layers | trainable parameters | file size (fp16) | file size (fp32) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, kwargs in configs:
            net = create_network(unet, **kwargs)
            params = sum(p.numel() for p in net.parameters())
            sizes = []
            for dtype in (torch.float16, torch.float32):
                path = net.save(Path(tmp) / "a.safetensors", dtype=dtype)
                sizes.append(path.stat().st_size / 2**20)
            print(f"| {label} | {len(net)} | {params:,} | {sizes[0]:.2f} MiB | {sizes[1]:.2f} MiB |")
            net.remove()


if __name__ == "__main__":
    main([
        ("lora, dim 4, attn-only", dict(algo="lora", dim=4, alpha=1, preset="attn-only")),
        ("lora, dim 4, attn-mlp", dict(algo="lora", dim=4, alpha=1, preset="attn-mlp")),
        ("lora (LoCon), dim 4, full", dict(algo="lora", dim=4, alpha=1, preset="full")),
        ("lora (LoCon Tucker), dim 4, full", dict(algo="lora", dim=4, alpha=1, preset="full", use_tucker=True)),
        ("lora, dim 32, attn-mlp", dict(algo="lora", dim=32, alpha=16, preset="attn-mlp")),
    ])
    sys.exit(0)
