"""SDXL (and any LDM-layout) UNet module names: diffusers paths ↔ SGM/LDM paths (FORMATS.md §1).

kohya writes SDXL UNet files with SGM paths (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`),
diffusers-trained files use diffusers paths (`lora_unet_down_blocks_1_attentions_0_…`). The block
mapping depends on the UNet configuration (levels, layers per block, which levels have attention),
so the map is built **forward**: every module path of a diffusers UNet is translated to its SGM path
and both are spelled with `naming.module_name`; names are never parsed back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..hosts import host_kind
from .naming import module_name

# The SDXL 1.0 base UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
       "conv_norm_out": "out.0", "conv_out": "out.2"}


def _per_block(value: Any, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * n


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    mapped = RESNET.get(head, head)
    return f"{mapped}.{tail}" if tail else mapped


class _Blocks:
    """Where each diffusers block lands among the SGM input/middle/output blocks."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        down = list(config["down_block_types"])
        up = list(config["up_block_types"])
        layers = _per_block(config.get("layers_per_block", 2), len(down))
        self.down_start, self.down_sampler = [], []
        at = 1
        for i in range(len(down)):
            self.down_start.append(at)
            at += layers[i]
            self.down_sampler.append(at if i < len(down) - 1 else None)
            if i < len(down) - 1:
                at += 1
        up_layers = [n + 1 for n in reversed(layers)]
        self.up_start, self.up_sampler = [], []
        at = 0
        for i in range(len(up)):
            self.up_start.append(at)
            has_attn = "Attn" in up[i]
            self.up_sampler.append(f"{at + up_layers[i] - 1}.{2 if has_attn else 1}" if i < len(up) - 1 else None)
            at += up_layers[i]


def sgm_path(path: str, config: Mapping[str, Any], _blocks: _Blocks | None = None) -> str | None:
    """The SGM/LDM module path of a diffusers UNet module path, or None when it has none."""
    blocks = _blocks or _Blocks(config)
    for head, mapped in TOP.items():
        if path == head or path.startswith(head + "."):
            return mapped + path[len(head):]
    parts = path.split(".")
    if parts[0] == "down_blocks" and len(parts) >= 4:
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{blocks.down_start[i] + j}.0" + (f".{_resnet(rest)}" if rest else "")
        if kind == "attentions":
            return f"input_blocks.{blocks.down_start[i] + j}.1" + (f".{rest}" if rest else "")
        if kind == "downsamplers" and rest.startswith("conv") and blocks.down_sampler[i] is not None:
            return f"input_blocks.{blocks.down_sampler[i]}.0.op" + rest[len("conv"):]
    if parts[0] == "mid_block" and len(parts) >= 3:
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * j}" + (f".{_resnet(rest)}" if rest else "")
        if kind == "attentions":
            return "middle_block.1" + (f".{rest}" if rest else "")
    if parts[0] == "up_blocks" and len(parts) >= 4:
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{blocks.up_start[i] + j}.0" + (f".{_resnet(rest)}" if rest else "")
        if kind == "attentions":
            return f"output_blocks.{blocks.up_start[i] + j}.1" + (f".{rest}" if rest else "")
        if kind == "upsamplers" and blocks.up_sampler[i] is not None:
            return f"output_blocks.{blocks.up_sampler[i]}" + (f".{rest}" if rest else "")
    return None


def unet_config(unet: nn.Module | Mapping[str, Any]) -> dict[str, Any]:
    config = unet if isinstance(unet, Mapping) else getattr(unet, "config", None)
    if not isinstance(config, Mapping) or "down_block_types" not in config:
        raise ValueError("expected a diffusers UNet2DConditionModel or its config")
    return dict(config)


def build_unet(config: Mapping[str, Any] | None = None) -> nn.Module:
    """A diffusers UNet of `config` (default SDXL base) on the meta device: structure only."""
    import torch
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in (config or SDXL_UNET_CONFIG).items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def name_map(unet: nn.Module, prefix: str = "lora_unet") -> dict[str, str]:
    """diffusers file module name → SGM file module name, for every adaptable layer of `unet`."""
    config = unet_config(unet)
    blocks = _Blocks(config)
    out = {}
    for path, module in unet.named_modules():
        if not path or host_kind(module) is None:
            continue
        target = sgm_path(path, config, blocks)
        if target is not None:
            out[module_name(prefix, unet, path)] = module_name(prefix, unet, target)
    return out


def state_dict_to_sgm(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers UNet state dict with SGM/LDM keys (`model.diffusion_model.` not added)."""
    blocks = _Blocks(config)
    out = {}
    for key, value in state.items():
        path, _, param = key.rpartition(".")
        target = sgm_path(path, config, blocks)
        if target is None:
            raise KeyError(f"no SGM counterpart for {key}")
        out[f"{target}.{param}"] = value
    return out
