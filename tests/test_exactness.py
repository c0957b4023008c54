"""Exactness for every algorithm and variant on every host layer and dtype — one matrix (TESTING.md):
identity at init, merged ≡ unmerged, bit-exact unmerge, multiplier, remove; then network-level
properties (NaN-refusing merges, stacking, merge order)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lycoris_like import MergeError, OverlapError, UnsupportedLayerError, algorithm_names, create_network

from conftest import VARIANTS, bits, linear_in_multiplier, make_host, make_unet, randomize, unet_inputs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    algo, options = VARIANTS[request.param]
    assert algo in algorithm_names()
    return algo, options


def adapted(host_name, variant, dtype=torch.float32, **kwargs):
    """A host layer with a fresh network of `variant` attached, its input, and the base output."""
    algo, options = variant
    model, x = make_host(host_name, dtype)
    base = model(x)
    try:
        net = create_network(model, algo=algo, dim=4, alpha=2, **options, **kwargs)
    except UnsupportedLayerError as exc:
        pytest.skip(str(exc))
    return model, x, base, net


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_identity_at_init_is_exact(host_name, variant, dtype):
    model, x, base, net = adapted(host_name, variant, dtype)
    assert torch.equal(net.adapters["0"].delta_weight(), torch.zeros_like(net.adapters["0"].delta_weight()))
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        for train in (True, False):
            model.train(train)
            assert torch.equal(model(x), base)
            with torch.no_grad():
                assert torch.equal(model(x), base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_forward_equals_unmerged_rebuild_forward_bit_exactly(host_name, variant, dtype):
    model, x, base, net = adapted(host_name, variant, dtype, multiplier=0.6, forward_mode="rebuild")
    randomize(net, std=0.5, seed=1)
    with torch.no_grad():
        unmerged = model(x)
        net.merge()
        merged = model(x)
    assert not torch.equal(unmerged, base)
    assert torch.equal(bits(merged), bits(unmerged))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fold_writes_the_merged_weights_and_leaves_a_plain_model(host_name, variant, dtype):
    """fold() (no backups, in place) writes exactly what merge() writes, detaches, and the
    network then refuses what would apply it twice."""
    model, x, base, net = adapted(host_name, variant, dtype, multiplier=0.6, forward_mode="rebuild")
    randomize(net, std=0.5, seed=1)
    with torch.no_grad():
        unmerged = model(x)
        net.merge()
        merged = {k: bits(v).clone() for k, v in model.state_dict().items()}
        net.fold()  # unmerges first, then folds in place
        assert not net.merged
        assert all(torch.equal(bits(v), merged[k]) for k, v in model.state_dict().items())
        assert "forward" not in model[0].__dict__  # detached: a plain module again
        assert torch.equal(bits(model(x)), bits(unmerged))
    assert not any("_lycoris_like_merges" in p.__dict__ for p in model.parameters())
    for call in (net.merge, net.fold, net.attach, net.bake):
        with pytest.raises(MergeError, match="folded"):
            call()
    net.remove()  # nothing left to remove
    assert all(torch.equal(bits(v), merged[k]) for k, v in model.state_dict().items())


def test_fold_refuses_nan_or_inf_before_writing_anything():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)).half()
    net = create_network(model, algo="ia3")
    randomize(net, std=0.3, seed=1)
    before = {k: bits(v).clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        net.adapters["1"].weight.fill_(1e30)
    with pytest.raises(MergeError, match="folding would create NaN/Inf in 1; no weight was changed"):
        net.fold()
    assert all(torch.equal(bits(v), before[k]) for k, v in model.state_dict().items())
    assert len(net.adapters) == 2 and "forward" in model[0].__dict__  # still attached and usable
    with torch.no_grad():
        net.adapters["1"].weight.fill_(0.5)
    net.fold()
    assert not torch.equal(bits(model[1].weight), before["1.weight"])


def test_bypass_matches_merged_within_tolerance(host_name, variant):
    model, x, base, net = adapted(host_name, variant, forward_mode="bypass")
    randomize(net, std=0.5, seed=2)
    with torch.no_grad():
        unmerged = model(x)
        net.merge()
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unmerge_restores_weights_bit_exactly_over_many_cycles(host_name, variant, dtype):
    model, x, base, net = adapted(host_name, variant, dtype)
    original = {k: bits(v).clone() for k, v in model.state_dict().items()}
    randomize(net, std=0.5, seed=3)
    for cycle in range(10):
        net.merge(multiplier=0.5 + cycle / 10)
        assert not torch.equal(bits(model[0].weight), original["0.weight"])
        net.unmerge()
        assert all(torch.equal(bits(v), original[k]) for k, v in model.state_dict().items())


def test_multiplier_zero_is_the_base_and_the_multiplier_is_linear(host_name, variant):
    model, x, base, net = adapted(host_name, variant, torch.float64)
    randomize(net, std=0.5, seed=4)
    one = model(x) - base
    assert one.abs().max() > 0
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        net.set_multiplier(0.0)
        assert torch.equal(model(x), base)
        if linear_in_multiplier(variant):
            net.set_multiplier(-1.7)
            torch.testing.assert_close(model(x) - base, -1.7 * one, rtol=1e-9, atol=1e-9)
        net.set_multiplier(1.0)


def test_save_load_round_trip_is_bit_exact(tmp_path, host_name, variant):
    from lycoris_like import load_network

    model, x, base, net = adapted(host_name, variant)
    randomize(net, std=0.5, seed=5)
    expected = model(x)
    written = net.file_state_dict()
    path = net.save(tmp_path / "a.safetensors")
    net.remove()
    assert torch.equal(model(x), base)
    loaded = load_network(model, path)
    assert loaded.adapters["0"].algo == variant[0]
    got = loaded.file_state_dict()
    assert sorted(got) == sorted(written)
    assert all(torch.equal(bits(got[k]), bits(written[k])) for k in written if written[k].is_floating_point())
    assert torch.equal(bits(model(x)), bits(expected))


def test_only_adapter_parameters_get_gradients(host_name, variant):
    model, x, base, net = adapted(host_name, variant)
    randomize(net, std=0.5, seed=6)
    model.requires_grad_(False)
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        net.zero_grad()
        model(x).square().sum().backward()
        assert all(p.grad is not None for p in net.parameters())
        assert all(p.grad is None for p in model.parameters())


def test_bypass_and_rebuild_give_the_same_gradients(host_name, variant):
    model, x, base, net = adapted(host_name, variant, torch.float64)
    randomize(net, std=0.5, seed=9)
    model.requires_grad_(False)
    grads = {}
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        net.zero_grad()
        model(x).square().sum().backward()
        grads[mode] = [p.grad.clone() for p in net.parameters()]
    assert all(g.abs().max() > 0 for g in grads["rebuild"])
    for a, b in zip(grads["rebuild"], grads["bypass"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_training_randomness_never_reaches_eval_merge_or_delta(host_name, variant):
    model, x, base, net = adapted(host_name, variant, dropout=0.5, rank_dropout=0.5, module_dropout=0.3)
    randomize(net, std=0.5, seed=7)
    adapter = net.adapters["0"]
    model.train()
    torch.manual_seed(0)
    noisy = [model(x) for _ in range(8)]
    assert any(not torch.equal(noisy[0], y) for y in noisy[1:])
    delta = adapter.delta_weight()
    model.eval()
    assert torch.equal(adapter.delta_weight(), delta)
    net.set_forward_mode("rebuild")
    with torch.no_grad():
        evals = [model(x) for _ in range(3)]
        assert all(torch.equal(evals[0], y) for y in evals)
        net.merge()
        assert torch.equal(model(x), evals[0])


def test_remove_restores_host_forward_and_state_dict_keys(host_name, variant):
    model, x, base, net = adapted(host_name, variant)
    keys = list(model.state_dict())
    randomize(net, std=0.5, seed=8)
    assert list(model.state_dict()) == keys
    assert not torch.equal(model(x), base)
    net.remove()
    assert "forward" not in model[0].__dict__
    assert torch.equal(model(x), base)
    net.attach()
    assert not torch.equal(model(x), base)


# ----------------------------------------------------------------------------- network level


def test_merge_refuses_nan_or_inf_without_touching_weights():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)).half()
    before = {k: bits(v).clone() for k, v in model.state_dict().items()}
    net = create_network(model, dim=2, alpha=2)
    with torch.no_grad():
        net.adapters["1"].lora_up.weight.fill_(1e4)
        net.adapters["1"].lora_down.weight.fill_(1e4)
    with pytest.raises(MergeError, match="1"):
        net.merge()
    assert all(torch.equal(bits(v), before[k]) for k, v in model.state_dict().items())
    assert not net.merged


def test_fp16_merge_computes_in_fp32_and_does_not_overflow():
    model = nn.Sequential(nn.Linear(1, 1, bias=False)).half()
    with torch.no_grad():
        model[0].weight.fill_(-60000.0)
    net = create_network(model, dim=1, alpha=1)
    with torch.no_grad():
        net.adapters["0"].lora_up.weight.fill_(1e5)  # ΔW = 1e5: not representable in fp16
        net.adapters["0"].lora_down.weight.fill_(1.0)
    net.merge()
    assert model[0].weight.item() == 40000.0
    net.unmerge()
    assert model[0].weight.item() == -60000.0


def test_rank_dropout_masks_whole_rank_components():
    model = nn.Sequential(nn.Linear(6, 5, bias=False))
    net = create_network(model, dim=8, alpha=8, rank_dropout=0.5, forward_mode="rebuild")
    randomize(net, std=0.5, seed=8)
    adapter = net.adapters["0"]
    torch.manual_seed(1)
    trained = adapter.delta_weight(True)
    torch.manual_seed(1)
    keep = (torch.rand(8) >= 0.5).float()
    expected = (adapter.lora_up.weight * keep) @ adapter.lora_down.weight
    torch.testing.assert_close(trained, expected)


def test_stacked_networks_add_and_remove_independently():
    model, x = make_host("conv2d-k3", torch.float64)
    base = model(x)
    a = create_network(model, dim=2, alpha=2)
    randomize(a, seed=9)
    ya = model(x)
    with pytest.raises(OverlapError):
        create_network(model, dim=2)
    b = create_network(model, dim=3, alpha=1, stack=True)
    randomize(b, seed=10)
    both = model(x)
    a.disable()
    yb = model(x)
    a.enable()
    torch.testing.assert_close(both - base, (ya - base) + (yb - base), rtol=1e-10, atol=1e-10)
    a.remove()
    torch.testing.assert_close(model(x), yb, rtol=0, atol=0)
    b.remove()
    assert torch.equal(model(x), base)


def test_sequential_merges_then_lifo_unmerges_restore_the_base():
    model, x = make_host("linear", torch.bfloat16)
    original = bits(model[0].weight).clone()
    a = create_network(model, dim=2, alpha=2)
    b = create_network(model, dim=2, alpha=2, stack=True)
    randomize(a, seed=11)
    randomize(b, seed=12)
    a.merge()
    b.merge()
    with pytest.raises(MergeError, match="reverse order"):
        a.unmerge()
    b.unmerge()
    a.unmerge()
    assert torch.equal(bits(model[0].weight), original)


def test_only_adapter_parameters_train_and_the_host_gets_no_grad():
    unet = make_unet().requires_grad_(False)
    net = create_network(unet, dim=2, alpha=1, preset="full")
    randomize(net, std=0.5, seed=13)
    names = dict(net.named_parameters())
    assert names and all(".lora_" in n for n in names)
    unet.train()
    unet(*unet_inputs()).sample.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert all(p.grad is None for p in unet.parameters())


def test_merge_on_a_real_unet_matches_unmerged_and_unmerges_exactly():
    unet = make_unet()
    inputs = unet_inputs()
    original = {k: bits(v).clone() for k, v in unet.state_dict().items()}
    net = create_network(unet, dim=4, alpha=2, use_tucker=True, forward_mode="rebuild")
    randomize(net, std=0.05, seed=14)
    with torch.no_grad():
        unmerged = unet(*inputs).sample
        net.merge()
        assert torch.equal(unet(*inputs).sample, unmerged)
        net.unmerge()
    assert all(torch.equal(bits(v), original[k]) for k, v in unet.state_dict().items())
    baked = net.bake()
    assert all(torch.equal(bits(v), original[k]) for k, v in unet.state_dict().items())
    net.merge()
    assert all(torch.equal(bits(baked[k]), bits(v)) for k, v in unet.state_dict().items())
