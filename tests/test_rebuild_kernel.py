"""The recomputing rebuild path (kernels/rebuild.py) against plain autograd, for every algorithm."""

from __future__ import annotations

import pytest
import torch

from lycoris_like import UnsupportedLayerError, create_network
from lycoris_like.kernels.rebuild import rebuilt_op
from lycoris_like.modules.compose import adapted_parameters

from conftest import VARIANTS, make_host, make_unet, randomize, unet_inputs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_recomputed_rebuild_matches_plain_autograd(host_name, variant):
    algo, options = VARIANTS[variant]
    model, x = make_host(host_name, torch.float64)
    try:
        net = create_network(model, algo=algo, dim=3, alpha=2, multiplier=0.7, rank_dropout=0.3, **options)
    except UnsupportedLayerError as exc:
        pytest.skip(str(exc))
    randomize(net, std=0.5, seed=1)
    adapter = net.adapters["0"]
    host = adapter.host
    model.requires_grad_(True)  # the host's own weight trains too: its gradient must come out right
    x = x.clone().requires_grad_(True)
    params = list(net.parameters()) + list(model.parameters())

    def build():
        return adapted_parameters(host, [adapter], [adapter.multiplier_value], [True])

    torch.manual_seed(3)
    y = rebuilt_op(x, build, host.op, host.op_grads, params)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x] + params, g, allow_unused=True)
    torch.manual_seed(3)
    weight, bias = build()
    plain = host.op(x, weight, bias)
    expected = torch.autograd.grad(plain, [x] + params, g, allow_unused=True)
    torch.testing.assert_close(y, plain, rtol=0, atol=0)
    for a, b in zip(got, expected):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_rebuilt_forward_does_not_keep_a_full_weight_alive(monkeypatch):
    """What autograd saves for backward, by size: the plain graph holds W′ per layer, ours only x
    (for weights of `plan.RECOMPUTE_ENTRIES` entries or more: here every layer of the small UNet)."""
    import lycoris_like.plan

    monkeypatch.setattr(lycoris_like.plan, "RECOMPUTE_ENTRIES", 1)
    unet = make_unet().requires_grad_(False)
    net = create_network(unet, dim=4, alpha=2, weight_decompose=True, forward_mode="rebuild")  # every layer rebuilds
    randomize(net, std=0.05, seed=2)
    shapes = {tuple(a.host.weight.shape) for a in net}

    def weight_sized_saves() -> int:
        saved: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            loss = unet(*unet_inputs()).sample.float().square().mean()  # what lives until backward
        loss.backward()
        return sum(1 for shape in saved if shape in shapes)

    unet.train()
    assert weight_sized_saves() == 0
    # The plain graph (what autocast falls back to) saves one rebuilt weight per layer (or more).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert weight_sized_saves() >= len(net)


def test_small_weights_keep_the_plain_graph_and_large_ones_recompute():
    """Below `plan.RECOMPUTE_ENTRIES` the rebuilt weight is kept for backward (a Python backward
    would cost more than the memory); at and above it only x is saved. Same gradients either way."""
    from lycoris_like import plan

    grads = []
    for entries, recomputes in ((10**9, False), (1, True)):
        model, x = make_host("linear", torch.float64)
        x.requires_grad_(True)  # its gradient needs W′: the plain graph saves it
        model.requires_grad_(False)
        net = create_network(model, algo="loha", dim=2, forward_mode="rebuild")
        randomize(net, std=0.3, seed=5)
        old = plan.RECOMPUTE_ENTRIES
        plan.RECOMPUTE_ENTRIES = entries
        try:
            saved: list[tuple[int, ...]] = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
                y = model(x)
            y.square().sum().backward()
        finally:
            plan.RECOMPUTE_ENTRIES = old
        weight_sized = [s for s in saved if sorted(s) == sorted(model[0].weight.shape)]
        assert bool(weight_sized) == (not recomputes)
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
