"""Real consumers: lycoris-lora 4.1.3 both ways, and diffusers' kohya LoRA loader."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from lycoris_like import create_network, load_network

from conftest import HOSTS, clip_inputs, make_clip, make_host, make_unet, randomize, unet_inputs

lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)

LYCORIS_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
# lycoris-lora 4.1.3 applies its LoCon delta with zero padding whatever the host's padding_mode.
PADDING_MODE_HOSTS = {"conv2d-reflect", "conv2d-circular"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def lycoris_preset(tmp_path):
    """lycoris' own "full" preset asserts on a duplicated name with diffusers 0.42; this is its
    full preset minus the time embedding (which it lists twice)."""
    from lycoris.kohya import LycorisNetworkKohya
    from lycoris.utils.preset import read_preset

    path = tmp_path / "preset.toml"
    path.write_text(LYCORIS_PRESET)
    LycorisNetworkKohya.apply_preset(read_preset(str(path)))
    return str(path)


@pytest.mark.parametrize("tucker", [False, True])
def test_lycoris_kohya_file_loads_into_ours_with_the_same_forward(tmp_path, lycoris_preset, tucker):
    from lycoris.kohya import create_network as lycoris_create

    unet, te = make_unet(), make_clip()
    ours_unet, ours_te = copy.deepcopy(unet), copy.deepcopy(te)
    theirs = lycoris_create(1.0, 4, 2, None, te, unet, algo="lora", preset=lycoris_preset,
                            use_tucker=tucker, conv_dim=3, conv_alpha=1)
    theirs.apply_to(te, unet, True, True)
    randomize(theirs, seed=1)
    with torch.no_grad():
        expected = unet(*unet_inputs()).sample, te(clip_inputs()).last_hidden_state
    theirs.save_weights(str(tmp_path / "lycoris.safetensors"), torch.float32, {})
    net = load_network({"lora_unet": ours_unet, "lora_te": ours_te}, tmp_path / "lycoris.safetensors")
    assert len(net) == len(theirs.unet_loras) + len(theirs.text_encoder_loras)
    assert any(a.tucker for a in net) == tucker
    with torch.no_grad():
        got = ours_unet(*unet_inputs()).sample, ours_te(clip_inputs()).last_hidden_state
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("host", sorted(set(HOSTS) - PADDING_MODE_HOSTS))
def test_lycoris_standalone_file_loads_into_ours(tmp_path, host):
    from lycoris import create_lycoris

    model, x = make_host(host)
    ours = copy.deepcopy(model)
    theirs = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo="lora", preset="full")
    theirs.apply_to()
    randomize(theirs, seed=2)
    expected = model(x)
    theirs.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    load_network(ours, tmp_path / "l.safetensors")
    assert rel_err(ours(x), expected) <= 1e-5


def test_our_unet_file_loads_in_lycoris_with_the_same_forward(tmp_path, lycoris_preset):
    from lycoris.kohya import create_network_from_weights

    unet = make_unet()
    theirs_unet = copy.deepcopy(unet)
    net = create_network(unet, dim=4, alpha=2, conv_dim=3, conv_alpha=1, use_tucker=True)
    randomize(net, seed=3)
    with torch.no_grad():
        expected = unet(*unet_inputs()).sample
    net.save(tmp_path / "ours.safetensors")
    theirs, weights = create_network_from_weights(1.0, str(tmp_path / "ours.safetensors"), None, None, theirs_unet)
    theirs.apply_to(None, theirs_unet, False, True)
    result = theirs.load_state_dict(weights, False)
    assert not result.missing_keys and not result.unexpected_keys
    assert len(theirs.unet_loras) == len(net)
    with torch.no_grad():
        assert rel_err(theirs_unet(*unet_inputs()).sample, expected) <= 1e-5


@pytest.mark.parametrize("host", sorted(set(HOSTS) - PADDING_MODE_HOSTS))
def test_our_file_loads_in_lycoris_create_lycoris_from_weights(tmp_path, host):
    from lycoris import create_lycoris_from_weights

    model, x = make_host(host)
    theirs_model = copy.deepcopy(model)
    net = create_network(model, dim=4, alpha=2, use_tucker=True)
    randomize(net, seed=4)
    expected = model(x)
    net.save(tmp_path / "ours.safetensors")
    theirs, weights = create_lycoris_from_weights(1.0, str(tmp_path / "ours.safetensors"), theirs_model)
    theirs.apply_to()
    theirs.load_state_dict(weights, False)
    assert len(theirs.loras) == 1
    assert rel_err(theirs_model(x), expected) <= 1e-5


@pytest.mark.parametrize("host", sorted(PADDING_MODE_HOSTS))
def test_lycoris_ignores_padding_mode_and_we_do_not(tmp_path, host):
    """Documents an upstream defect: on reflect/circular convs lycoris-lora's forward is wrong."""
    from lycoris import create_lycoris_from_weights

    model, x = make_host(host)
    theirs_model = copy.deepcopy(model)
    net = create_network(model, dim=4, alpha=2)
    randomize(net, seed=5)
    conv = model[0]
    reference = conv._conv_forward(x, conv.weight + net.adapters["0"].delta_weight(), conv.bias)
    assert rel_err(model(x), reference) <= 1e-6
    net.save(tmp_path / "ours.safetensors")
    theirs, weights = create_lycoris_from_weights(1.0, str(tmp_path / "ours.safetensors"), theirs_model)
    theirs.apply_to()
    theirs.load_state_dict(weights, False)
    assert rel_err(theirs_model(x), reference) > 1e-2


def test_our_file_loads_in_diffusers_and_fuses_to_the_same_output(tmp_path):
    pytest.importorskip("peft")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    unet = make_unet()
    theirs = copy.deepcopy(unet)
    net = create_network(unet, dim=4, alpha=2, conv_dim=3, conv_alpha=1, preset="full")
    randomize(net, seed=6)
    with torch.no_grad():
        expected = unet(*unet_inputs()).sample
    net.save(tmp_path / "ours.safetensors")
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path / "ours.safetensors"))
    assert len(state) == 2 * len(net)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, theirs, adapter_name="ours")
    with torch.no_grad():
        assert rel_err(theirs(*unet_inputs()).sample, expected) <= 1e-5
        theirs.fuse_lora(lora_scale=1.0)
        assert rel_err(theirs(*unet_inputs()).sample, expected) <= 1e-5
