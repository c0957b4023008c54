"""DoRA (weight_decompose): the formula, both axes, multiplier semantics, gradients, files, peers."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from lycoris_like import ShapeMismatchError, create_network, load_network

from conftest import HOSTS, bits, fast, has_fast_path, make_host, randomize, reference_op

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
NO_PADDING_MODE = sorted(set(HOSTS) - {"conv2d-reflect", "conv2d-circular"})


def naive_dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, on_out: bool) -> torch.Tensor:
    """W' = m · (W + ΔW) / ‖W + ΔW‖, one slice at a time."""
    merged = weight + delta
    out = torch.empty_like(merged)
    for i in range(merged.shape[0 if on_out else 1]):
        part = merged[i] if on_out else merged[:, i]
        m = magnitude.reshape(-1)[i]
        scaled = part * (m / torch.sqrt((part * part).sum()))
        if on_out:
            out[i] = scaled
        else:
            out[:, i] = scaled
    return out


def lora_delta(adapter) -> torch.Tensor:
    up = adapter.lora_up.weight.reshape(adapter.lora_up.weight.shape[0], -1)
    return (up @ adapter.lora_down.weight.reshape(adapter.rank, -1)).reshape(adapter.host.weight.shape) * adapter.scale


def perturb_magnitude(net, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in net:
            a.dora_scale.mul_(1 + 0.2 * torch.rand(a.dora_scale.shape, generator=g, dtype=torch.float64).to(a.dora_scale.dtype))


@pytest.mark.parametrize("on_out", [True, False], ids=["out-axis", "in-axis"])
def test_dora_matches_the_formula_and_is_identity_at_init(host_name, on_out):
    model, x = make_host(host_name, torch.float64)
    base = model(x)
    net = create_network(model, dim=4, alpha=2, weight_decompose=True, wd_on_out=on_out)
    adapter = net.adapters["0"]
    expected_shape = (20 if "conv" in host_name else 80, 1) if on_out else (1, adapter.host.in_features)
    assert tuple(adapter.dora_scale.shape[:2]) == expected_shape
    assert torch.equal(model(x), base) and torch.equal(adapter.delta_weight(), torch.zeros_like(model[0].weight))
    randomize(net, seed=1)
    perturb_magnitude(net, seed=2)
    with torch.no_grad():
        adapter.dora_scale.copy_(adapter.dora_scale.abs() + 0.5)
    weight = model[0].weight
    expected = naive_dora(weight, lora_delta(adapter), adapter.dora_scale, on_out)
    torch.testing.assert_close(weight + adapter.delta_weight(), expected, rtol=1e-12, atol=1e-12)
    # output axis: W′ = s ⊙ (W + ΔW) scales output channels; LoRA's bypass exists on ungrouped hosts
    assert has_fast_path(adapter) == (on_out and getattr(model[0], "groups", 1) == 1)


@pytest.mark.parametrize("algo, options", [("lora", {}), ("lora", {"use_scalar": True}), ("lokr", {"factor": 2})])
def test_output_axis_bypass_equals_the_rebuild_in_value_and_gradient(host_name, algo, options):
    """DoRA's bypass (s − 1)⊙Wx + s⊙ΔWx, its norm from the factors: identity at init bit for bit;
    the output equals the naive formula through the naive op (LoRA), and bypass and rebuild agree
    on outputs and every gradient."""
    outs, grads = [], []
    for mode in ("rebuild", "bypass"):
        model, x = make_host(host_name, torch.float64)
        model.requires_grad_(False)
        base = model(x)
        net = create_network(model, algo=algo, dim=3, alpha=2, weight_decompose=True, forward_mode=mode, **options)
        assert torch.equal(model(x), base)  # identity at init, in either mode
        randomize(net, seed=4)
        perturb_magnitude(net, seed=5)
        net.set_multiplier(0.7)
        adapter = net.adapters["0"]
        assert fast(adapter, x) == (mode == "bypass" and has_fast_path(adapter))
        x = x.clone().requires_grad_(True)
        y = model(x)
        if algo == "lora":  # the independent reference: the naive formula through the naive op
            with torch.no_grad():
                weight = model[0].weight
                delta = lora_delta(adapter) * (adapter.scalar if adapter.scalar is not None else 1)
                decomposed = naive_dora(weight, delta, adapter.dora_scale, True)
                expected = reference_op(model[0], x, weight + 0.7 * (decomposed - weight))
            torch.testing.assert_close(y.detach(), expected, rtol=1e-10, atol=1e-10)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([x.grad] + [p.grad for p in net.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_multiplier_interpolates_from_the_base_to_the_decomposed_weight(host_name):
    model, x = make_host(host_name, torch.float64)
    base = model(x)
    net = create_network(model, dim=4, alpha=2, weight_decompose=True)
    randomize(net, seed=3)
    perturb_magnitude(net, seed=4)
    full = model(x)
    net.set_multiplier(0.0)
    assert torch.equal(model(x), base)
    net.set_multiplier(0.3)
    torch.testing.assert_close(model(x), base + 0.3 * (full - base), rtol=1e-10, atol=1e-10)


def test_norm_is_detached_in_the_gradient():
    model, x = make_host("linear", torch.float64)
    model.requires_grad_(False)
    net = create_network(model, dim=3, alpha=3, weight_decompose=True)
    randomize(net, seed=5)
    adapter = net.adapters["0"]
    model(x).sum().backward()
    got = [adapter.lora_down.weight.grad.clone(), adapter.dora_scale.grad.clone()]
    down = adapter.lora_down.weight.detach().clone().requires_grad_(True)
    magnitude = adapter.dora_scale.detach().clone().requires_grad_(True)
    weight = model[0].weight
    merged = weight + (adapter.lora_up.weight @ down) * adapter.scale
    norm = merged.norm(dim=1, keepdim=True).detach()  # the paper's §4.3: a constant in backward
    y = x @ (magnitude * merged / norm).T + model[0].bias
    y.sum().backward()
    torch.testing.assert_close(got[0], down.grad)
    torch.testing.assert_close(got[1], magnitude.grad)


@pytest.mark.parametrize("on_out", [True, False], ids=["out-axis", "in-axis"])
def test_file_round_trip_infers_the_axis_from_the_shape(tmp_path, host_name, on_out):
    model, x = make_host(host_name)
    net = create_network(model, dim=4, alpha=2, weight_decompose=True, wd_on_out=on_out)
    randomize(net, seed=6)
    perturb_magnitude(net, seed=7)
    expected = model(x)
    path = net.save(tmp_path / "d.safetensors")
    net.remove()
    loaded = load_network(model, path)
    assert loaded.adapters["0"].wd_on_out == on_out
    assert torch.equal(bits(model(x)), bits(expected))


def test_bad_dora_scale_shape_is_refused(tmp_path):
    from safetensors.torch import save_file

    model, _ = make_host("linear")
    net = create_network(model, dim=2, weight_decompose=True)
    sd = net.file_state_dict()
    net.remove()
    sd["lycoris_0.dora_scale"] = torch.ones(79, 1)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ShapeMismatchError, match="lycoris_0.dora_scale"):
        load_network(model, tmp_path / "bad.safetensors")
    assert "forward" not in model[0].__dict__


def test_dora_is_only_offered_where_it_applies():
    from lycoris_like import ConfigError, register_algorithm
    from lycoris_like.modules.base import AdapterModule

    assert "weight_decompose" in __import__("lycoris_like").get_algorithm("lora").option_names()

    @register_algorithm("test-no-dora")
    class NoDora(AdapterModule):
        def adapter_delta(self, train=False):
            return torch.zeros_like(self.host.weight)

    assert "weight_decompose" not in NoDora.option_names()
    with pytest.raises(ConfigError, match="unknown options"):
        create_network(nn.Sequential(nn.Linear(2, 2)), algo="test-no-dora", weight_decompose=True)


# ----------------------------------------------------------------------------- peers


@pytest.mark.parametrize("host", NO_PADDING_MODE)
def test_lycoris_dora_file_loads_into_ours_and_ours_into_lycoris(tmp_path, host):
    from lycoris import create_lycoris, create_lycoris_from_weights

    model, x = make_host(host)
    ours_model, theirs_model = copy.deepcopy(model), copy.deepcopy(model)
    theirs = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo="lora", preset="full", dora_wd=True)
    theirs.apply_to()
    randomize(theirs, seed=8)
    expected = model(x)
    theirs.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    load_network(ours_model, tmp_path / "l.safetensors")
    assert ((ours_model(x) - expected).abs().max() / expected.abs().max()).item() <= 1e-5

    net = create_network(model := copy.deepcopy(theirs_model), dim=4, alpha=2, weight_decompose=True)
    randomize(net, seed=9)
    ours = model(x)
    net.save(tmp_path / "o.safetensors")
    back, weights = create_lycoris_from_weights(1.0, str(tmp_path / "o.safetensors"), theirs_model)
    back.apply_to()
    back.load_state_dict(weights, False)
    assert ((theirs_model(x) - ours) .abs().max() / ours.abs().max()).item() <= 1e-5


def test_lycoris_dora_ignores_multiplier_zero_and_ours_does_not(tmp_path):
    """Upstream defect: lycoris-lora 4.1.3's DoRA at multiplier 0 is not the base model."""
    from lycoris import create_lycoris_from_weights

    model, x = make_host("linear")
    base = model(x)
    theirs_model = copy.deepcopy(model)
    net = create_network(model, dim=4, alpha=2, weight_decompose=True)
    randomize(net, seed=10)
    net.save(tmp_path / "o.safetensors")
    net.set_multiplier(0.0)
    assert torch.equal(model(x), base)
    theirs, weights = create_lycoris_from_weights(0.0, str(tmp_path / "o.safetensors"), theirs_model)
    theirs.apply_to()
    theirs.load_state_dict(weights, False)
    assert (theirs_model(x) - base).abs().max().item() > 1e-3


def test_lycoris_cannot_reload_input_axis_dora_files_we_can(tmp_path):
    from lycoris import create_lycoris_from_weights

    model, x = make_host("linear")
    theirs_model = copy.deepcopy(model)
    net = create_network(model, dim=4, alpha=2, weight_decompose=True, wd_on_out=False)
    randomize(net, seed=11)
    net.save(tmp_path / "in.safetensors")
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
        create_lycoris_from_weights(1.0, str(tmp_path / "in.safetensors"), theirs_model)
    expected = model(x)
    net.remove()
    load_network(model, tmp_path / "in.safetensors")
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("host", ["linear", "conv2d-k3", "conv2d-k1"])
def test_peft_dora_parity(host):
    from peft import LoraConfig, inject_adapter_in_model

    model, x = make_host(host)
    theirs = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=2, target_modules=["0"], use_dora=True, init_lora_weights=False), copy.deepcopy(model)
    )
    net = create_network(model, dim=4, alpha=2, weight_decompose=True)
    randomize(net, seed=12)
    perturb_magnitude(net, seed=13)
    adapter, layer = net.adapters["0"], theirs[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(adapter.lora_down.weight)
        layer.lora_B["default"].weight.copy_(adapter.lora_up.weight)
        magnitude = layer.lora_magnitude_vector["default"].weight
        magnitude.copy_(adapter.dora_scale.reshape(magnitude.shape))
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)


def test_algo_dora_is_lora_with_weight_decompose(tmp_path):
    model, x = make_host("conv2d-k3")
    net = create_network(model, algo="dora", dim=3, wd_on_out=False)
    adapter = net.adapters["0"]
    assert adapter.algo == "lora" and adapter.dora_scale.shape == (1, 12, 1, 1)  # input axis, as asked
    assert net.config["algo"] == "lora" and net.config["weight_decompose"] is True
    randomize(net, seed=3)
    expected = model(x)
    loaded = load_network(make_host("conv2d-k3")[0], net.save(tmp_path / "d.safetensors"))
    assert type(loaded.adapters["0"]) is type(adapter)
    fresh = loaded.adapters["0"].host.module
    torch.testing.assert_close(fresh(x), expected, rtol=1e-6, atol=1e-6)
