"""Print, from the code, what each built-in preset selects on real model configs (meta device).

Run: python docs/scripts/preset_table.py   (a few seconds; downloads nothing)
"""

from collections import Counter

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lycoris_like import BUILTIN_PRESETS, create_network

SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), sample_size=128)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280,
              hidden_act="gelu")


def models():
    with torch.device("meta"):
        return [
        ("SD1.5 UNet", UNet2DConditionModel(**SD15)),
        ("SDXL UNet", UNet2DConditionModel(**SDXL)),
        ("SD3 medium transformer", SD3Transformer2DModel(num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                                              joint_attention_dim=4096, caption_projection_dim=1536,
                                                              pooled_projection_dim=2048, out_channels=16, sample_size=128)),
        ("Flux.1 transformer", FluxTransformer2DModel(guidance_embeds=True)),
        ("CLIP-L text encoder (SD1.5, SDXL te1)", CLIPTextModel(CLIPTextConfig(**CLIP_L))),
        ("OpenCLIP-G text encoder (SDXL te2)", CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))),
        ]


def kinds(net) -> str:
    count = Counter()
    for adapter in net:
        host = adapter.host
        count["Linear" if host.kind == "linear" else f"{host.kind[-2:].upper()} {'×'.join(map(str, host.kernel_size))}"] += 1
    return ", ".join(f"{n} {k}" for k, n in sorted(count.items()))


def main() -> None:
    print("| model | " + " | ".join(BUILTIN_PRESETS) + " |")
    print("|---|" + "---|" * len(BUILTIN_PRESETS))
    for name, model in models():
        cells = []
        for preset in BUILTIN_PRESETS:
            net = create_network(model, dim=1, preset=preset)
            cells.append(f"{len(net)} ({kinds(net)})")
            net.remove()
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
