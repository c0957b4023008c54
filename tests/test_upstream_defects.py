"""Regression tests for lycoris-lora 4.1.3 defects we must not copy (ALGORITHMS.md, issue 3).

Each test shows the defect in lycoris-lora on a file both libraries read, and that ours does the
right thing. (Others live next to their algorithm: the doubled γ in LoHa/LoKr merges in
test_loha.py/test_lokr.py, the IA³ bias in test_ia3_full.py, DoRA at multiplier 0 and the
input-axis loader in test_dora.py, padding_mode in test_interop.py.)
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from lycoris_like import create_network, load_network

from conftest import make_host, make_unet, randomize, unet_inputs

lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)


@pytest.mark.parametrize("algo, key", [("loha", "hada_w2_a"), ("lokr", "lokr_w2_b")])
def test_lycoris_merge_ignores_use_scalar(algo, key):
    """Its merge_to leaves out the trained scalar that its forward applies; ours merges the forward."""
    from lycoris import create_lycoris

    model, x = make_host("linear")
    ours_model = copy.deepcopy(model)
    theirs = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=4, algo=algo, preset="full", use_scalar=True)
    theirs.apply_to()
    randomize(theirs, std=0.3, seed=1)
    (module,) = theirs.loras
    with torch.no_grad():
        module.scalar.fill_(0.25)
    forward = model(x)
    sd = {f"lycoris_0.{k}": v.detach().clone() for k, v in module.custom_state_dict().items()}
    theirs.merge_to(1.0)
    theirs_merged = model[0].weight.detach().clone()

    from lycoris_like import network_from_tensors

    ours = network_from_tensors(ours_model, sd)
    torch.testing.assert_close(ours_model(x), forward, rtol=1e-5, atol=1e-6)
    ours.merge()
    torch.testing.assert_close(ours_model(x), forward, rtol=1e-5, atol=1e-6)
    their_delta = theirs_merged - ours_model[0].weight.detach()
    assert their_delta.abs().max() > 1e-3  # their merged weight is not their forward's weight


def test_lycoris_kohya_merge_ignores_the_multiplier(tmp_path):
    """kohya's `merge_to` always merges at strength 1; ours merges at the network's multiplier."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
    from lycoris.utils.preset import read_preset

    preset = tmp_path / "p.toml"
    preset.write_text('unet_target_module = ["Transformer2DModel"]\nunet_target_name = []\n')
    LycorisNetworkKohya.apply_preset(read_preset(str(preset)))
    unet = make_unet()
    theirs_unet, ours_unet = copy.deepcopy(unet), copy.deepcopy(unet)
    net = create_network(unet, dim=4, alpha=4, preset="attn-only")
    randomize(net, seed=2)
    path = net.save(tmp_path / "a.safetensors")
    theirs, weights = create_network_from_weights(0.5, str(path), None, None, theirs_unet)
    theirs.merge_to(None, theirs_unet, weights, torch.float32, "cpu")
    full = load_network(ours_unet, path, multiplier=1.0)
    with torch.no_grad():
        full_strength = ours_unet(*unet_inputs()).sample
        assert torch.allclose(theirs_unet(*unet_inputs()).sample, full_strength, rtol=1e-4, atol=1e-5)
    full.remove()
    half = load_network(ours_unet, path, multiplier=0.5)
    half.merge()
    with torch.no_grad():
        assert not torch.allclose(ours_unet(*unet_inputs()).sample, full_strength, rtol=1e-3, atol=1e-4)


def test_lycoris_dora_is_silently_skipped_in_bypass_mode(tmp_path):
    """lycoris-lora's LoCon bypass forward drops the DoRA normalisation; ours never bypasses DoRA."""
    from lycoris import create_lycoris_from_weights

    model, x = make_host("linear")
    bypass_model, rebuild_model = copy.deepcopy(model), copy.deepcopy(model)
    net = create_network(model, dim=4, alpha=2, weight_decompose=True)
    randomize(net, seed=3)
    with torch.no_grad():
        net.adapters["0"].dora_scale.mul_(1.5)
    path = net.save(tmp_path / "d.safetensors")
    net.set_forward_mode("bypass")
    ours = model(x)
    outputs = {}
    for name, m, bypass in (("bypass", bypass_model, True), ("rebuild", rebuild_model, False)):
        theirs, weights = create_lycoris_from_weights(1.0, str(path), m)
        theirs.apply_to()
        theirs.load_state_dict(weights, False)
        for module in theirs.loras:
            module.bypass_mode = bypass
        outputs[name] = m(x)
    torch.testing.assert_close(outputs["rebuild"], ours, rtol=1e-5, atol=1e-5)
    assert (outputs["bypass"] - ours).abs().max() > 1e-2
