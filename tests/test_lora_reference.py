"""LoRA/LoCon ΔW and forward against naive formulas written here, on every host layer type."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lycoris_like import create_network
from lycoris_like.kernels.lowrank import lowrank_delta

from conftest import make_host, randomize, reference_op

VARIANTS = {
    "plain": {},
    "tucker": {"use_tucker": True},
    "scalar": {"use_scalar": True},
    "rslora": {"rs_lora": True},
}


def naive_delta(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None, scale: float) -> torch.Tensor:
    """ΔW by explicit sums over the rank (and the Tucker core) — no matmul, no einsum."""
    out, r = up.shape[0], down.shape[0]
    up = up.reshape(out, r)
    if mid is None:
        trailing = down.shape[1:]
        delta = torch.zeros(out, *trailing, dtype=up.dtype)
        for j in range(r):
            delta += up[:, j].reshape(out, *[1] * len(trailing)) * down[j].unsqueeze(0)
        return scale * delta
    down = down.reshape(r, down.shape[1])
    k = mid.shape[2:]
    delta = torch.zeros(out, down.shape[1], *k, dtype=up.dtype)
    ones = [1] * len(k)
    for a in range(r):
        for b in range(r):
            delta += up[:, a].reshape(out, 1, *ones) * down[b].reshape(1, -1, *ones) * mid[a, b].reshape(1, 1, *k)
    return scale * delta


def expected_scale(dim: int, alpha: float, rs_lora: bool) -> float:
    return alpha / math.sqrt(dim) if rs_lora else alpha / dim


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_delta_weight_matches_naive_formula(host_name, variant):
    model, _ = make_host(host_name, torch.float64)
    net = create_network(model, dim=4, alpha=3, **VARIANTS[variant])
    randomize(net, seed=3)
    (adapter,) = net.adapters.values()
    up = adapter.lora_up.weight * (adapter.scalar if adapter.scalar is not None else 1)
    mid = adapter.lora_mid.weight if adapter.lora_mid is not None else None
    expected = naive_delta(up, adapter.lora_down.weight, mid, expected_scale(4, 3.0, variant == "rslora"))
    assert adapter.delta_weight().shape == model[0].weight.shape
    torch.testing.assert_close(adapter.delta_weight(), expected, rtol=1e-12, atol=1e-12)
    if variant == "tucker":
        assert (mid is not None) == (model[0].weight[0, 0].numel() > 1)


@pytest.mark.parametrize("mode", ["rebuild", "bypass"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_matches_naive_layer_maths(host_name, variant, mode):
    model, x = make_host(host_name, torch.float64)
    net = create_network(model, dim=4, alpha=3, multiplier=0.7, forward_mode=mode, **VARIANTS[variant])
    randomize(net, seed=4)
    (adapter,) = net.adapters.values()
    up = adapter.lora_up.weight * (adapter.scalar if adapter.scalar is not None else 1)
    mid = adapter.lora_mid.weight if adapter.lora_mid is not None else None
    delta = naive_delta(up, adapter.lora_down.weight, mid, expected_scale(4, 3.0, variant == "rslora"))
    expected = reference_op(model[0], x, model[0].weight + 0.7 * delta)
    base = reference_op(model[0], x, model[0].weight)
    y = model(x)
    assert not torch.allclose(y, base)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


def test_fp32_forward_is_within_float_tolerance_of_fp64(host_name):
    model, x = make_host(host_name, torch.float64)
    net = create_network(model, dim=4, alpha=2, use_tucker=True)
    randomize(net, seed=6)
    ref = model(x)
    model32 = model.float()
    for a in net:
        a.float()
    torch.testing.assert_close(model32(x.float()), ref.float(), rtol=1e-5, atol=1e-5)


def test_lowrank_kernel_on_all_layouts():
    torch.manual_seed(0)
    for k in ((), (3,), (3, 1), (3, 3, 3)):
        up, down = torch.randn(20, 4, *[1] * len(k), dtype=torch.float64), torch.randn(4, 12, *k, dtype=torch.float64)
        torch.testing.assert_close(lowrank_delta(up, down), naive_delta(up, down, None, 1.0))
        if k:
            mid = torch.randn(4, 4, *k, dtype=torch.float64)
            down1 = torch.randn(4, 12, *[1] * len(k), dtype=torch.float64)
            torch.testing.assert_close(lowrank_delta(up, down1, mid), naive_delta(up, down1, mid, 1.0))


def test_conv_dim_and_alpha_apply_to_wide_convs_only():
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3))
    net = create_network(model, dim=4, alpha=2, conv_dim=8, conv_alpha=1)
    ranks = {path: (a.rank, a.alpha) for path, a in net.adapters.items()}
    assert ranks == {"0": (4, 2.0), "1": (4, 2.0), "2": (8, 1.0)}


def test_tucker_parameter_count_matches_the_paper():
    model = nn.Sequential(nn.Conv2d(12, 20, 3))
    plain = sum(p.numel() for p in create_network(model, dim=4).parameters())
    tucker = sum(p.numel() for p in create_network(model, dim=4, use_tucker=True, stack=True).parameters())
    assert plain == 4 * (12 * 9 + 20)
    assert tucker == 4 * (4 * 9 + 12 + 20)


@pytest.mark.parametrize("variant", ["plain", "tucker"])
def test_fused_bypass_add_gradients_and_exact_identity(host_name, variant):
    """The bypass adds m·up(down(x)) inside one addmm/baddbmm: forward and gradients (x, down, up)
    against plain autograd through the naive layer maths, unbatched conv inputs too; at init and
    at m = 0 the output is the host's, bit-exact."""
    model, x = make_host(host_name, torch.float64)
    net = create_network(model, dim=4, alpha=3, forward_mode="bypass", **VARIANTS[variant])
    conv = model[0]
    inputs = [x, x[0]] if isinstance(conv, nn.modules.conv._ConvNd) else [x]
    for inp in inputs:
        assert torch.equal(model(inp), type(conv).forward(conv, inp))  # up = 0 at init: the host's own bits
    randomize(net, seed=5)
    net.set_multiplier(0.0)
    assert torch.equal(model(x), type(conv).forward(conv, x))
    net.set_multiplier(0.7)
    (adapter,) = net.adapters.values()
    params = [p for p in net.parameters()]
    for inp in inputs:
        inp = inp.clone().requires_grad_(True)
        y = model(inp)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        got = torch.autograd.grad(y, [inp, *params], g)
        mid = adapter.lora_mid.weight if adapter.lora_mid is not None else None
        delta = naive_delta(adapter.lora_up.weight, adapter.lora_down.weight, mid, expected_scale(4, 3.0, False))
        ref = reference_op(conv, inp, conv.weight + 0.7 * delta)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        expected = torch.autograd.grad(ref, [inp, *params], g)
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
