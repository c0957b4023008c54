"""Exactly which layers each preset selects on real models, and the pattern/override rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lycoris_like import ConfigError, UnknownAlgorithmError, create_network

from conftest import make_clip, make_unet

ATTN_NAMES = {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "q_proj", "k_proj", "v_proj", "out_proj"}


def layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def spec_attn(path: str) -> bool:
    """Attention projections by name: the specification, independent of the role code."""
    return path.rsplit(".", 1)[-1] in ATTN_NAMES or path.endswith("to_out.0")


def spec_mlp(path: str) -> bool:
    return (
        ".ff.net." in path
        or ".ff_context.net." in path
        or ".mlp.fc" in path
        or path.rsplit(".", 1)[-1] in ("proj_in", "proj_mlp")
        or (path.endswith(".proj_out") and path.count(".") > 0)
    )


def selected(model: nn.Module, preset, **kw) -> set[str]:
    net = create_network(model, dim=2, preset=preset, **kw)
    paths = set(net.adapters)
    net.remove()
    return paths


def test_unet_presets_select_exactly_the_specified_layers():
    unet = make_unet()
    everything = set(layers(unet))
    attn = {p for p in everything if spec_attn(p)}
    mlp = {p for p in everything if spec_mlp(p)}
    assert len(attn) == 8 * 4 and len(mlp) == 4 * 4  # 2 transformers × 2 attentions × q,k,v,out
    assert selected(unet, "attn-only") == attn
    assert selected(unet, "attn-mlp") == attn | mlp
    assert selected(unet, "full") == everything
    assert {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"} <= everything
    assert "down_blocks.0.downsamplers.0.conv" in everything and "up_blocks.0.upsamplers.0.conv" in everything


def test_sd15_unet_full_preset_counts(tmp_path):
    from diffusers import UNet2DConditionModel

    config = dict(
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    counts = {p: len(selected(unet, p)) for p in ("attn-only", "attn-mlp", "full")}
    assert counts == {"attn-only": 128, "attn-mlp": 192, "full": 282}


@pytest.mark.parametrize("projection", [False, True])
def test_clip_presets(projection):
    clip = make_clip(projection=projection)
    everything = set(layers(clip))
    attn = {p for p in everything if spec_attn(p)}
    mlp = {p for p in everything if spec_mlp(p)}
    assert len(attn) == 2 * 4 and len(mlp) == 2 * 2
    assert selected(clip, "attn-only") == attn
    assert selected(clip, "attn-mlp") == attn | mlp
    assert selected(clip, "full") == attn | mlp  # text_projection is never in a preset
    if projection:
        assert selected(clip, None, targets=["text_projection"]) == {"text_projection"}


def dit_models():
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    return {
        "sd3": SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                     pooled_projection_dim=16, out_channels=4),
        "flux": FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                       num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                       axes_dims_rope=(4, 2, 2)),
        "pixart": PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, caption_channels=16, in_channels=4, cross_attention_dim=16,
                                           out_channels=8, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                           norm_elementwise_affine=False, norm_eps=1e-6),
    }


@pytest.mark.parametrize("family", ["sd3", "flux", "pixart"])
def test_dit_block_presets(family):
    model = dit_models()[family]
    everything = set(layers(model))
    in_blocks = {p for p in everything if "transformer_blocks." in p}
    attn = {p for p in in_blocks if spec_attn(p)}
    mlp = {p for p in in_blocks if spec_mlp(p)}
    assert attn and mlp
    assert selected(model, "attn-only") == attn
    assert selected(model, "attn-mlp") == attn | mlp
    assert selected(model, "full") == everything
    if family == "flux":
        assert {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"} <= mlp
        assert "proj_out" not in selected(model, "attn-mlp")


def test_generic_model_fallback_by_class_names():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = Attention(), Mlp()

    model = nn.Sequential(nn.Conv2d(3, 8, 4), Block(), nn.Linear(8, 2))
    assert selected(model, "attn-only") == {"1.attn.qkv", "1.attn.proj"}
    assert selected(model, "attn-mlp") == {"1.attn.qkv", "1.attn.proj", "1.mlp.fc1", "1.mlp.fc2"}
    assert selected(model, "full") == {"0", "1.attn.qkv", "1.attn.proj", "1.mlp.fc1", "1.mlp.fc2", "2"}
    with pytest.raises(ConfigError, match="selects no layer"):
        create_network(nn.Sequential(nn.Linear(2, 2)), preset="attn-only")


def test_targets_narrow_exclude_removes_and_typos_are_errors():
    unet = make_unet()
    got = selected(unet, "attn-only", targets=["down_blocks.*"], exclude=["*.attn2"])
    assert got == {p for p in layers(unet) if p.startswith("down_blocks.") and spec_attn(p) and ".attn2." not in p}
    assert selected(unet, "full", targets=["re:conv_(in|out)$"]) == {"conv_in", "conv_out"}
    with pytest.raises(ConfigError, match="outside the preset"):
        create_network(unet, preset="attn-only", targets=["conv_in"])
    with pytest.raises(ConfigError, match="matches no supported layer"):
        create_network(unet, exclude=["*.atn1"])
    with pytest.raises(ConfigError, match="regular expression"):
        create_network(unet, targets=["re:("])
    assert "forward" not in unet.conv_in.__dict__


def test_overrides_most_specific_wins_and_unmatched_is_an_error():
    unet = make_unet()
    net = create_network(
        unet, dim=2, alpha=1, preset="attn-mlp",
        overrides={
            "*.attn1.*": {"dim": 8},
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": {"dim": 6, "alpha": 3},
            "*.ff.*": {"use_tucker": True, "alpha": 4},
        },
    )
    ranks = {p: (a.rank, a.alpha) for p, a in net.adapters.items()}
    assert ranks["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == (6, 3.0)
    assert ranks["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"] == (8, 1.0)
    assert ranks["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == (2, 1.0)
    assert ranks["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"] == (2, 4.0)
    net.remove()
    with pytest.raises(ConfigError, match="matches no selected layer"):
        create_network(unet, preset="attn-only", overrides={"*.ff.*": {"dim": 8}})
    with pytest.raises(ConfigError, match="unknown options"):
        create_network(unet, overrides={"*.to_q": {"use_tuker": True}})


def test_user_presets_as_dict_and_toml(tmp_path):
    unet = make_unet()
    preset = {"base": "attn-only", "include": ["conv_in"], "exclude": ["*.attn2"], "overrides": {"conv_in": {"dim": 3}}}
    expected = {p for p in layers(unet) if spec_attn(p) and ".attn2." not in p} | {"conv_in"}
    net = create_network(unet, dim=2, preset=preset)
    assert set(net.adapters) == expected and net.adapters["conv_in"].rank == 3
    net.remove()
    toml = tmp_path / "mine.toml"
    toml.write_text('base = "attn-only"\ninclude = ["conv_in"]\nexclude = ["*.attn2"]\n[overrides.conv_in]\ndim = 3\n')
    net = create_network(unet, dim=2, preset=toml)
    assert set(net.adapters) == expected and net.config["preset"] == "mine"
    net.remove()
    classes = create_network(unet, dim=2, preset={"module_classes": ["ResnetBlock2D"], "class_overrides": {"ResnetBlock2D": {"dim": 5}}})
    assert set(classes.adapters) == {p for p in layers(unet) if ".resnets." in p}
    assert {a.rank for a in classes.adapters.values()} == {5}
    classes.remove()
    with pytest.raises(ConfigError, match="unknown preset keys"):
        create_network(unet, preset={"bsae": "full"})
    with pytest.raises(ConfigError, match="unknown preset"):
        create_network(unet, preset="attn_only")


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"algo": "lorax"}, UnknownAlgorithmError),
        ({"dim": 0}, ConfigError),
        ({"dim": -2}, ConfigError),
        ({"dim": 2.5}, ConfigError),
        ({"conv_dim": 0}, ConfigError),
        ({"alpha": -1}, ConfigError),
        ({"alpha": float("nan")}, ConfigError),
        ({"use_tuker": True}, ConfigError),
        ({"dropout": 1.5}, ConfigError),
        ({"forward_mode": "fast"}, ConfigError),
        ({"multiplier": float("inf")}, ConfigError),
    ],
)
def test_bad_configurations_fail_at_creation_and_leave_the_model_alone(kwargs, error):
    unet = make_unet()
    with pytest.raises(error):
        create_network(unet, **kwargs)
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_unknown_option_suggests_the_right_name():
    with pytest.raises(ConfigError, match="did you mean 'use_tucker'"):
        create_network(nn.Sequential(nn.Linear(2, 2)), use_tuckr=True)


def test_pipeline_dict_builds_one_network_over_several_models():
    unet, te1, te2 = make_unet(), make_clip(), make_clip(projection=True)
    net = create_network({"lora_unet": unet, "lora_te1": te1, "lora_te2": te2}, dim=2, preset="attn-only")
    keys = {p.split(".", 1)[0] for p in net.adapters}
    assert keys == {"lora_unet", "lora_te1", "lora_te2"}
    assert len(net) == 32 + 8 + 8
    with pytest.raises(ConfigError):
        create_network({"lora.unet": unet})
