"""The configurations the benchmark compares: ours, peft 0.21 and lycoris-lora 4.1.3 on the same 278 layers."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

TARGET_CLASSES = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]


def build_unet(quick: bool, width: int | None = None) -> nn.Module:
    """The SD1.5 UNet config with random weights (half width with `quick`; any base `width`),
    built on the current default device."""
    from diffusers import UNet2DConditionModel

    width = width or (160 if quick else 320)
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(width, 2 * width, 4 * width, 4 * width), layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=min(32, width // 4), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def inputs(batch: int = 1, latent: int = 32, timestep: int = 10, device: str = "cpu",
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent (batch, 4, latent, latent), timestep, context (batch, 77, 768): the CPU protocol's
    defaults, or the GPU protocol's (batch 4, 64×64 latents, timestep 500, bf16)."""
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
    context = torch.randn(batch, 77, 768, generator=g).to(device, dtype)
    return sample, torch.tensor([timestep] * batch, device=device), context


def target_names(unet: nn.Module) -> list[str]:
    names = []
    for name, module in unet.named_modules():
        if type(module).__name__ in TARGET_CLASSES:
            names += [f"{name}.{sub}" for sub, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return names


@dataclass
class Handle:
    """What a built configuration exposes to the harness."""

    params: Callable[[], Iterable[torch.nn.Parameter]]
    layers: int
    merge: Callable[[], Any] = lambda: None
    save: Callable[[Path], Any] = lambda path: None
    fold: Callable[[], Any] | None = None  # a merge for good, no backups; the peers' merge is one
    adapter_dtype: str = "-"

    def merge_for_good(self) -> None:
        (self.fold or self.merge)()

    def trainable(self) -> int:
        return sum(p.numel() for p in self.params() if p.requires_grad)

    def randomize(self) -> None:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in self.params():
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


@dataclass
class Config:
    build: Callable[[nn.Module], Handle]
    load: Callable[[nn.Module, Path], Any] = field(default=lambda unet, path: None)


# ----------------------------------------------------------------------------- ours


def _dtype_of(params: Iterable[torch.nn.Parameter]) -> str:
    return ",".join(sorted({str(p.dtype).replace("torch.", "") for p in params})) or "-"


def ours(algo: str, **options: Any) -> Config:
    def build(unet: nn.Module) -> Handle:
        from lycoris_like import create_network

        net = create_network(unet, algo=algo, dim=4, alpha=2, preset={"module_classes": TARGET_CLASSES}, **options)
        return Handle(net.parameters, len(net), net.merge, net.save, net.fold, _dtype_of(net.parameters()))

    def load(unet: nn.Module, path: Path) -> None:
        from lycoris_like import load_network

        load_network(unet, path)

    return Config(build, load)


def base() -> Config:
    return Config(lambda unet: Handle(lambda: [], 0))


# ----------------------------------------------------------------------------- peft


def peft(kind: str, adapter_dtype: torch.dtype | None = None, **options: Any) -> Config:
    """peft's `inject_adapter_in_model` keeps the host dtype; `adapter_dtype` casts the adapter
    afterwards (float32: what `get_peft_model` does by default on a half-precision host)."""

    def make_config(unet: nn.Module):
        import peft as p

        names = target_names(unet)
        if kind == "lora":
            return p.LoraConfig(r=4, lora_alpha=2, target_modules=names, **options)
        if kind == "loha":
            return p.LoHaConfig(r=4, alpha=2, target_modules=names, **options)
        if kind == "lokr":
            return p.LoKrConfig(r=4, alpha=2, target_modules=names, **options)
        if kind == "ia3":
            return p.IA3Config(target_modules=names, feedforward_modules=[], **options)
        raise ValueError(kind)

    def build(unet: nn.Module) -> Handle:
        from peft import get_peft_model_state_dict, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer
        from safetensors.torch import save_file

        inject_adapter_in_model(make_config(unet), unet)
        layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        params = lambda: [p for p in unet.parameters() if p.requires_grad]  # noqa: E731
        if adapter_dtype is not None:
            for p in params():
                p.data = p.data.to(adapter_dtype)

        def merge() -> None:
            for layer in layers:
                layer.merge()

        def save(path: Path) -> None:
            save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}, path)

        return Handle(params, len(layers), merge, save, adapter_dtype=_dtype_of(params()))

    def load(unet: nn.Module, path: Path) -> None:
        from peft import inject_adapter_in_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        inject_adapter_in_model(make_config(unet), unet)
        set_peft_model_state_dict(unet, load_file(path))

    return Config(build, load)


# ----------------------------------------------------------------------------- lycoris-lora


def _lycoris_preset() -> str:
    path = Path(tempfile.gettempdir()) / "lycoris_like_bench_preset.toml"
    path.write_text("target_module = " + repr(TARGET_CLASSES).replace("'", '"') + "\ntarget_name = []\n")
    return str(path)


def lycoris(algo: str, **options: Any) -> Config:
    def build(unet: nn.Module) -> Handle:
        from lycoris import create_lycoris

        net = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, algo=algo, preset=_lycoris_preset(), **options)
        net.apply_to()
        net.to(next(unet.parameters()).device)  # its modules are made on the CPU (4.1.3)
        return Handle(net.parameters, len(net.loras), net.merge_to,
                      lambda path: net.save_weights(str(path), torch.float32, {}), adapter_dtype=_dtype_of(net.parameters()))

    def load(unet: nn.Module, path: Path) -> None:
        from lycoris import create_lycoris_from_weights

        net, weights = create_lycoris_from_weights(1.0, str(path), unet)
        net.apply_to()
        net.load_state_dict(weights, False)

    return Config(build, load)


CONFIGS: dict[str, Config] = {
    "base": base(),
    "ours-lora": ours("lora"),
    "ours-locon-tucker": ours("lora", use_tucker=True),
    "ours-loha": ours("loha"),
    "ours-lokr": ours("lokr", factor=8),
    "ours-ia3": ours("ia3"),
    "ours-dora": ours("lora", weight_decompose=True),
    "ours-svdiff": ours("svdiff"),
    "ours-sara": ours("sara", threshold=2e-3),
    # θ selecting ≈ 50 M entries of this random-weight UNet: what θ = 2e-3 selects on a trained SD1.5
    "ours-sara-50m": ours("sara", threshold=6.6e-4),
    "peft-lora": peft("lora"),
    "peft-loha": peft("loha"),
    "peft-lokr": peft("lokr", decompose_factor=8),
    "peft-ia3": peft("ia3"),
    "peft-dora": peft("lora", use_dora=True),
    # Equal adapter dtype on a half-precision host (the GPU protocol): ours in bf16, peft in fp32.
    **{f"ours-{name}-bf16": ours(algo, dtype=torch.bfloat16, **opts) for name, (algo, opts) in {
        "lora": ("lora", {}), "loha": ("loha", {}), "lokr": ("lokr", {"factor": 8}), "ia3": ("ia3", {}),
        "dora": ("lora", {"weight_decompose": True})}.items()},
    **{f"peft-{name}-fp32": peft(kind, torch.float32, **opts) for name, (kind, opts) in {
        "lora": ("lora", {}), "loha": ("loha", {}), "lokr": ("lokr", {"decompose_factor": 8}), "ia3": ("ia3", {}),
        "dora": ("lora", {"use_dora": True})}.items()},
    "lycoris-lora": lycoris("lora"),
    "lycoris-loha": lycoris("loha"),
    "lycoris-lokr": lycoris("lokr", factor=8),
    "lycoris-ia3": lycoris("ia3"),
    "lycoris-dora": lycoris("lora", dora_wd=True),
}
PEERS: dict[str, dict[str, str]] = {
    f"ours-{algo}": {"peft": f"peft-{algo}", "lycoris": f"lycoris-{algo}"} for algo in ("lora", "loha", "lokr", "ia3", "dora")
}
"""Who each configuration is compared with. On a half-precision host (the GPU protocol) the
default configurations differ in adapter dtype (ours fp32, peft as injected: bf16), so there
ours-X is also compared with peft-X-fp32, and ours-X-bf16 with peft-X."""
PEERS.update({f"ours-{algo}-bf16": {"peft": f"peft-{algo}"} for algo in ("lora", "loha", "lokr", "ia3", "dora")})
EQUAL_DTYPE_PEERS = {f"ours-{algo}": f"peft-{algo}-fp32" for algo in ("lora", "loha", "lokr", "ia3", "dora")}
PEERS["ours-locon-tucker"] = {"peft": "peft-lora", "lycoris": "lycoris-lora"}
