"""A plain diffusers + accelerate training loop with a lycoris_like adapter registered on the UNet.

The idioms of diffusers' own example scripts work unchanged once the network is registered
(`lycoris_like.register`): the optimizer takes `filter(lambda p: p.requires_grad,
unet.parameters())`, `accelerator.prepare(unet, optimizer)` wraps the UNet (DDP under
`accelerate launch`), and `accelerator.save_state` / `load_state` checkpoint the adapters with the
UNet. Everything is built here — a tiny UNet from a config with random weights and procedurally
generated latents and text embeddings — so it runs anywhere, on CPU, without downloads:

    python examples/train_text_to_image.py --output-dir out --steps 20
    python examples/train_text_to_image.py --output-dir out --steps 20 --stop-after 10      # interrupted
    python examples/train_text_to_image.py --output-dir out --steps 20 --resume out/checkpoint-10
    accelerate launch --num_processes 2 examples/train_text_to_image.py --output-dir out   # DDP

For real work, load `UNet2DConditionModel.from_pretrained(...)`, encode your images with the VAE
and your captions with the text encoder instead of `batch()`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DConditionModel

from lycoris_like import create_network, register

UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
CLASSES, TOKENS = 4, 6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--algo", default="lora")
    p.add_argument("--dim", type=int, default=4)
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save an accelerate checkpoint every N steps (0: never)")
    p.add_argument("--stop-after", type=int, default=0, help="stop after this step, as an interruption would")
    p.add_argument("--resume", type=Path, help="a checkpoint-N folder to continue from")
    return p.parse_args(argv)


def batch(step: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and text embeddings of `size` samples, a function of (seed, step) only: each class
    is a stripe pattern with its own frequency and embedding."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    labels = torch.randint(0, CLASSES, (size,), generator=g)
    grid = torch.linspace(0, math.pi, UNET_CONFIG["sample_size"])
    stripes = torch.sin((labels[:, None, None] + 1) * (grid[:, None] + grid[None, :]))
    latents = stripes[:, None].expand(-1, UNET_CONFIG["in_channels"], -1, -1) + 0.05 * torch.randn(size, 4, 8, 8, generator=g)
    table = torch.randn(CLASSES, TOKENS, UNET_CONFIG["cross_attention_dim"], generator=torch.Generator().manual_seed(seed))
    return latents, table[labels]


def noisy(latents: torch.Tensor, scheduler: DDPMScheduler, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=g)
    return scheduler.add_noise(latents, noise, timesteps), timesteps, noise


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.requires_grad_(False)  # freeze before registering: requires_grad_ would reach the adapters too
    network = create_network(unet, algo=args.algo, dim=args.dim, alpha=args.alpha, preset="attn-mlp")
    register(network, unet)  # the adapters become unet.lycoris_like: parameters, state_dict, DDP
    unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(filter(lambda p: p.requires_grad, unet.parameters()), lr=args.lr)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    unet, optimizer = accelerator.prepare(unet, optimizer)

    start = 0
    if args.resume is not None:
        accelerator.load_state(str(args.resume))  # the UNet's state (adapters included), optimizer, RNG
        start = json.loads((args.resume / "step.json").read_text())["step"]

    def validation_loss() -> float:
        latents, context = batch(-1, 8, args.seed)
        inputs, timesteps, noise = noisy(latents, scheduler, torch.Generator().manual_seed(args.seed))
        with torch.no_grad(), accelerator.autocast():
            prediction = unet(inputs.to(accelerator.device), timesteps.to(accelerator.device), context.to(accelerator.device)).sample
        return F.mse_loss(prediction.float(), noise.to(prediction.device)).item()

    before = validation_loss()
    losses = []
    for step in range(start + 1, args.steps + 1):
        latents, context = batch(step, args.batch, args.seed)
        share = latents.chunk(accelerator.num_processes)[accelerator.process_index]  # each process its part
        inputs, timesteps, noise = noisy(share, scheduler, torch.Generator().manual_seed(args.seed + step))
        context = context.chunk(accelerator.num_processes)[accelerator.process_index]
        with accelerator.autocast():
            prediction = unet(inputs.to(accelerator.device), timesteps.to(accelerator.device), context.to(accelerator.device)).sample
        loss = F.mse_loss(prediction.float(), noise.to(prediction.device))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        accelerator.print(f"step {step:4d}  loss {loss.item():.4f}")
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            folder = args.output_dir / f"checkpoint-{step}"
            accelerator.save_state(str(folder))
            if accelerator.is_main_process:
                (folder / "step.json").write_text(json.dumps({"step": step}))
                network.save(folder / "adapter.safetensors")
        if step == args.stop_after:
            break
    after = validation_loss()

    metrics = {"validation_loss_before": before, "validation_loss_after": after, "losses": losses, "last_step": step if losses else start}
    if accelerator.is_main_process:
        network.save(args.output_dir / "adapter.safetensors", metadata={"modelspec.title": "train_text_to_image example"})
        (args.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        accelerator.print(f"validation loss {before:.4f} -> {after:.4f}; wrote {args.output_dir / 'adapter.safetensors'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
