"""The AdapterNetwork API: state dicts, switches, compile, autocast, legacy diffusers layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lycoris_like import ConfigError, MergeError, create_network, get_algorithm, register_algorithm
from lycoris_like.modules.base import AdapterModule

from conftest import make_clip, make_host, make_unet, randomize, unet_inputs


def test_state_dict_round_trip_resumes_training_state():
    model, x = make_host("conv2d-k3")
    net = create_network(model, dim=3, alpha=2, use_scalar=True, use_tucker=True)
    randomize(net, seed=1)
    state = net.state_dict()
    assert set(state) == {f"lycoris_0.{k}" for k in ("lora_down.weight", "lora_mid.weight", "lora_up.weight", "scalar")}
    expected = model(x)
    net.remove()
    other = create_network(model, dim=3, alpha=2, use_scalar=True, use_tucker=True)
    other.load_state_dict(state)
    assert torch.equal(model(x), expected)


def test_enable_disable_and_multiplier_switches():
    model, x = make_host("linear")
    base = model(x)
    net = create_network(model, dim=2, multiplier=0.5)
    randomize(net, seed=2)
    half = model(x)
    net.disable()
    assert torch.equal(model(x), base)
    net.enable()
    assert torch.equal(model(x), half)
    net.set_multiplier(1.0)
    assert net.multiplier == 1.0 and not torch.equal(model(x), half)
    with pytest.raises(ConfigError):
        net.set_multiplier(float("nan"))


def test_merge_state_errors_and_bake_leaves_the_model_alone():
    model, x = make_host("linear")
    net = create_network(model, dim=2)
    randomize(net, seed=3)
    with pytest.raises(MergeError):
        net.unmerge()
    before = model[0].weight.clone()
    baked = net.bake()
    assert torch.equal(model[0].weight, before) and not torch.equal(baked["0.weight"], before)
    net.merge()
    with pytest.raises(MergeError):
        net.merge()
    assert torch.equal(baked["0.weight"], model[0].weight)
    net.remove()
    assert torch.equal(model[0].weight, before) and not net.merged


def test_pipeline_bake_names_the_model():
    net = create_network({"lora_unet": make_unet(), "lora_te": make_clip()}, dim=2, preset="attn-only")
    with pytest.raises(ConfigError, match="name the model"):
        net.bake()
    state = net.bake("lora_te")
    assert "encoder.layers.0.self_attn.q_proj.weight" in state
    with pytest.raises(ConfigError):
        net.forward()


def test_network_forward_runs_the_model():
    model, x = make_host("linear")
    net = create_network(model, dim=2)
    randomize(net, seed=4)
    assert torch.equal(net(x), model(x))


def test_torch_compile_matches_eager_and_multiplier_changes_do_not_recompile():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    x = torch.randn(4, 16)
    net = create_network(model, dim=4, alpha=2, forward_mode="bypass")
    randomize(net, seed=5)
    model.requires_grad_(False)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip(net.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)
    net.set_multiplier(0.25)
    with torch.no_grad():
        compiled(x)  # no_grad changes the guards: one more compile here …
    with torch._dynamo.config.patch(error_on_recompile=True):
        for m in (0.75, 0.0, -2.0):  # … but a new multiplier never recompiles
            net.set_multiplier(m)
            out = compiled(x)
            torch.testing.assert_close(out, model(x))
            out.sum().backward()


def test_compiled_unet_has_no_graph_breaks_and_matches_eager():
    torch._dynamo.reset()
    unet = make_unet().requires_grad_(False)
    net = create_network(unet, dim=4, alpha=2, use_tucker=True)
    randomize(net, std=0.05, seed=7)
    inputs = unet_inputs()
    eager = unet(*inputs).sample
    eager.square().mean().backward()
    eager_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    out = torch.compile(unet, backend="aot_eager", fullgraph=True)(*inputs).sample
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(net.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    unet = make_unet()
    net = create_network(unet, dim=4, alpha=2)
    randomize(net, std=0.05, seed=6)
    inputs = unet_inputs()
    with torch.no_grad():
        full = unet(*inputs).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = unet(*inputs).sample
    assert low.dtype == torch.bfloat16
    assert ((low.float() - full).abs().max() / full.abs().max()).item() < 0.05


def test_legacy_diffusers_lora_compatible_layers_are_hosts():
    from diffusers.models.lora import LoRACompatibleConv, LoRACompatibleLinear

    model = nn.Sequential(LoRACompatibleLinear(6, 5), LoRACompatibleConv(3, 4, 3, padding=1))
    net = create_network(model, dim=2)
    assert set(net.adapters) == {"0", "1"}


def test_layers_that_override_forward_are_not_adapted():
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ConfigError, match="selects no layer"):
        create_network(nn.Sequential(Scaled(3, 3)))


def test_a_new_algorithm_is_one_small_class():
    @register_algorithm("test-bias-shift")
    class BiasShift(AdapterModule):
        file_keys = frozenset({"shift"})
        signature_keys = frozenset({"shift"})

        def __init__(self, host, dim=1, alpha=None, **common):
            super().__init__(host, **common)
            self.shift = nn.Parameter(torch.zeros(host.out_features, **self.factory()))

        def delta_weight(self, train=False):
            return torch.zeros_like(self.host.weight, dtype=self.param_dtype)

        def delta_bias(self):
            return self.shift

        def file_tensors(self):
            return {"shift": self.shift.detach()}

        @classmethod
        def from_file_tensors(cls, host, tensors, name, **options):
            module = cls(host, **options)
            module.shift.data.copy_(tensors["shift"])
            return module

    assert get_algorithm("test-bias-shift") is BiasShift
    model, x = make_host("linear")
    base = model(x)
    net = create_network(model, algo="test-bias-shift")
    with torch.no_grad():
        net.adapters["0"].shift.fill_(1.0)
    torch.testing.assert_close(model(x), base + 1.0)
    net.merge()
    torch.testing.assert_close(model(x), base + 1.0)
    net.unmerge()
    torch.testing.assert_close(model(x), base + 1.0)
    net.remove()
    assert torch.equal(model(x), base)


def test_param_groups_default_to_the_optimizer_lr_or_one_given_lr():
    model, x = make_host("linear")
    net = create_network(model, dim=2)
    groups = net.param_groups()
    assert len(groups) == 1 and "lr" not in groups[0]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in net.parameters()}
    optimizer = torch.optim.SGD(groups, lr=0.5)
    assert optimizer.param_groups[0]["lr"] == 0.5
    assert net.param_groups(lr=1e-3)[0]["lr"] == 1e-3
