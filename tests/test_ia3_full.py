"""(IA)³ and full/diff: ΔW, Δb and the forward against formulas written here, on every host layer;
the bias rule; training (cost model, rank dropout, the fine-tuning oracle for `full`); files; and
parity with lycoris-lora 4.1.3 and peft 0.21.2 (including the upstream defects we differ on)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import lycoris_like.modules.full  # noqa: F401  (registers "full"/"diff")
import lycoris_like.modules.ia3  # noqa: F401  (registers "ia3")
from lycoris_like import ConfigError, IncompatibleFileError, ShapeMismatchError, create_network, load_network
from lycoris_like.formats.container import read_safetensors, write_safetensors
from lycoris_like.modules.full import Full
from lycoris_like.kernels.rescale import channel_scale_add
from lycoris_like.modules.ia3 import IA3

from conftest import HOSTS, bits, fast, has_fast_path, make_host, randomize, reference_op, saved_numels

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

SIDES = {"output": False, "input": True}
# lycoris-lora 4.1.3 builds its own conv deltas with zero padding whatever the host's padding_mode.
PADDING_MODE_HOSTS = {"conv2d-reflect", "conv2d-circular"}
BIASED_HOSTS = sorted(set(HOSTS) - {"linear-nobias"})


# ----------------------------------------------------------------------------- independent references


def on_channels(vec: torch.Tensor, t: torch.Tensor, linear: bool) -> torch.Tensor:
    """`vec` (C,) shaped for t's channel axis: last for Linear, 1 for batched convs."""
    return vec if linear else vec.reshape(1, -1, *[1] * (t.dim() - 2))


def naive_ia3_delta(module: nn.Module, vec: torch.Tensor, on_input: bool) -> torch.Tensor:
    """ΔW[o, c, …] = W[o, c, …]·l[channel], channel by explicit index arithmetic per entry."""
    weight = module.weight.detach()
    out, per_group = weight.shape[:2]
    groups = getattr(module, "groups", 1)
    delta = torch.empty_like(weight)
    for o in range(out):
        for c in range(per_group):
            channel = (o // (out // groups)) * per_group + c if on_input else o
            delta[o, c] = weight[o, c] * vec[channel]
    return delta


def ia3_net(host: str, on_input: bool, dtype=torch.float64, seed: int = 3, **kwargs):
    model, x = make_host(host, dtype)
    net = create_network(model, algo="ia3", train_on_input=on_input, **kwargs)
    randomize(net, std=0.3, seed=seed)
    (adapter,) = net.adapters.values()
    return model, x, net, adapter


# ----------------------------------------------------------------------------- (IA)³: ΔW, Δb, forward


@pytest.mark.parametrize("side", sorted(SIDES))
def test_ia3_delta_weight_and_bias_match_naive_formula(host_name, side):
    model, _, _, adapter = ia3_net(host_name, SIDES[side])
    conv = model[0]
    channels = conv.weight.shape[1] * getattr(conv, "groups", 1) if SIDES[side] else conv.weight.shape[0]
    vec = adapter.weight.detach().reshape(-1)
    assert vec.numel() == channels
    assert adapter.weight.shape == ((channels,) if isinstance(conv, nn.Linear) else (1, channels) + (1,) * (conv.weight.dim() - 2))
    torch.testing.assert_close(adapter.delta_weight(), naive_ia3_delta(conv, vec, SIDES[side]), rtol=0, atol=0)
    if SIDES[side] or conv.bias is None:
        assert adapter.delta_bias() is None
    else:
        torch.testing.assert_close(adapter.delta_bias(), conv.bias.detach() * vec, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["rebuild", "bypass"])
@pytest.mark.parametrize("side", sorted(SIDES))
def test_ia3_forward_is_explicit_pre_or_post_scaling(host_name, side, mode):
    model, x, net, adapter = ia3_net(host_name, SIDES[side], multiplier=0.7, forward_mode=mode)
    conv, linear = model[0], isinstance(model[0], nn.Linear)
    scale = 1 + 0.7 * adapter.weight.detach().reshape(-1)
    base = reference_op(conv, x, conv.weight, conv.bias)
    if SIDES[side]:
        expected = reference_op(conv, x * on_channels(scale, x, linear), conv.weight, conv.bias)
    else:
        expected = base * on_channels(scale, base, linear)
    y = model(x)
    assert not torch.allclose(y, base)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("side", sorted(SIDES))
@pytest.mark.parametrize("host", ["linear", "conv2d-groups2", "conv2d-reflect", "conv1d-k3"])
def test_ia3_merged_equals_unmerged_with_bias(host, side):
    """The bias rule holds in merges: bit-exact against the rebuild forward, float-close to bypass."""
    model, x, net, adapter = ia3_net(host, SIDES[side], dtype=torch.float32, multiplier=0.6, forward_mode="rebuild")
    conv = model[0]
    weight0, bias0 = bits(conv.weight).clone(), conv.bias.detach().clone()
    vec = adapter.weight.detach().reshape(-1)
    with torch.no_grad():
        rebuild = model(x)
        net.set_forward_mode("bypass")
        bypass = model(x)
        net.merge()
        merged = model(x)
    assert torch.equal(bits(merged), bits(rebuild))
    torch.testing.assert_close(bypass, merged, rtol=1e-5, atol=1e-5)
    if SIDES[side]:  # the input side leaves the bias alone
        assert torch.equal(bits(conv.bias), bits(bias0))
    else:  # the output side scales it with the rows
        torch.testing.assert_close(conv.bias, bias0 * (1 + 0.6 * vec), rtol=1e-6, atol=0)
    net.unmerge()
    assert torch.equal(bits(conv.weight), weight0) and torch.equal(bits(conv.bias), bits(bias0))


def test_ia3_multiplier_is_linear_and_zero_is_exact():
    model, x, net, adapter = ia3_net("conv2d-k3", False, dtype=torch.float32, forward_mode="rebuild")
    base = model[0]._conv_forward(x, model[0].weight, model[0].bias)
    outs = {}
    for m in (0.0, 0.5, 1.0):
        net.set_multiplier(m)
        outs[m] = model(x)
    assert torch.equal(outs[0.0], base)
    torch.testing.assert_close(outs[0.5] - base, 0.5 * (outs[1.0] - base), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- (IA)³: training


@pytest.mark.parametrize("host", ["linear", "conv2d-k3", "conv3d-k1"])
def test_ia3_training_picks_the_output_side_bypass_and_its_gradients_match_rebuild(host):
    model, x, net, adapter = ia3_net(host, False)
    model.requires_grad_(False)
    model.train()
    assert fast(adapter, x)  # rebuilding would make autograd form the full weight gradient
    grads = {}
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        net.zero_grad()
        model(x).square().sum().backward()
        grads[mode] = adapter.weight.grad.clone()
    torch.testing.assert_close(grads["rebuild"], grads["bypass"], rtol=1e-10, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())
    _, _, _, input_side = ia3_net(host, True)
    assert not has_fast_path(input_side) and not fast(input_side, x)


def test_ia3_cost_model():
    _, x, _, adapter = ia3_net("linear", False)
    tokens = lambda n: torch.zeros(n, 48, dtype=x.dtype)  # noqa: E731
    assert fast(adapter, tokens(4096))  # training: bypass however many tokens
    with torch.no_grad():  # inference: building ΔW once beats scaling many outputs
        assert not fast(adapter, tokens(4096))
        assert fast(adapter, tokens(3))
        assert fast(adapter, tokens(48))  # a tie (48·80 = 80·48) takes the output map: no rebuild
    assert adapter.bypass_flops(10) == 10 * 80 and adapter.rebuild_flops() == 80 * 48


def test_ia3_bypass_needs_the_pure_host_output_when_stacked_with_a_rebuild():
    """With another adapter rebuilding in the same call, (IA)³ rebuilds too: it scales W only."""
    model, x = make_host("conv2d-k3", torch.float64)
    full = create_network(model, algo="full", forward_mode="rebuild")
    ia3 = create_network(model, algo="ia3", stack=True, forward_mode="bypass")
    randomize(full, seed=1)
    randomize(ia3, std=0.3, seed=2)
    conv = model[0]
    vec = ia3.adapters["0"].weight.detach().reshape(-1)
    diff, diff_b = full.adapters["0"].diff.detach(), full.adapters["0"].diff_b.detach()
    weight = conv.weight + diff + conv.weight * vec.reshape(-1, 1, 1, 1)
    bias = conv.bias + diff_b + conv.bias * vec
    torch.testing.assert_close(model(x), reference_op(conv, x, weight, bias), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("side", sorted(SIDES))
@pytest.mark.parametrize("host", ["linear", "conv2d-groups2"])
def test_ia3_rank_dropout_masks_the_vector_in_training_only(host, side):
    model, x, net, adapter = ia3_net(host, SIDES[side], rank_dropout=0.5, rank_dropout_scale=True)
    model.eval()
    with torch.no_grad():
        clean = model(x)
        model.train()
        out = {}
        for mode in ("rebuild", "bypass"):
            net.set_forward_mode(mode)
            torch.manual_seed(7)
            out[mode] = model(x)
        torch.manual_seed(7)
        keep = (torch.rand(adapter.channels) >= 0.5).double() / 0.5
    conv, linear = model[0], isinstance(model[0], nn.Linear)
    vec = adapter.weight.detach().reshape(-1)
    if SIDES[side]:
        expected = reference_op(conv, x * on_channels(1 + vec * keep, x, linear), conv.weight, conv.bias)
    else:  # ΔW is masked, Δb = b ⊙ l never is
        pure = reference_op(conv, x, conv.weight, None)
        expected = pure * on_channels(1 + vec * keep, pure, linear) + on_channels(conv.bias * (1 + vec), pure, linear)
    assert not torch.allclose(out["rebuild"], clean)
    torch.testing.assert_close(out["rebuild"], expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["bypass"], expected, rtol=1e-10, atol=1e-10)
    model.eval()
    net.set_forward_mode("auto")
    with torch.no_grad():
        torch.testing.assert_close(model(x), clean, rtol=0, atol=0)
    model.train()
    torch.testing.assert_close(adapter.delta_weight(), naive_ia3_delta(conv, vec, SIDES[side]), rtol=0, atol=0)


def test_ia3_options():
    model, _ = make_host("linear")
    net = create_network(model, algo="ia3", dim=64, alpha=3)  # accepted and ignored
    assert sum(p.numel() for p in net.parameters()) == 80
    assert net.adapters["0"].config() == {"algo": "ia3", "train_on_input": False}
    net.remove()
    with pytest.raises(ConfigError, match="weight_decompose"):
        create_network(model, algo="ia3", weight_decompose=True)
    with pytest.raises(ConfigError, match="train_on_input"):
        create_network(model, algo="ia3", train_on_inputs=True)
    assert "weight_decompose" not in IA3.option_names() and "weight_decompose" not in Full.option_names()


# ----------------------------------------------------------------------------- (IA)³: files


@pytest.mark.parametrize("side", sorted(SIDES))
@pytest.mark.parametrize("host", ["linear", "conv2d-groups2", "conv3d-k3"])
def test_ia3_save_load_is_bit_exact(tmp_path, host, side):
    model, x, net, adapter = ia3_net(host, SIDES[side], dtype=torch.float32)
    fresh, base = make_host(host)[0], make_host(host)[0]  # the same seeded weights
    expected = model(x)
    net.save(tmp_path / "a.safetensors")
    tensors, _ = read_safetensors(tmp_path / "a.safetensors")
    channels = adapter.channels
    shape = (channels,) if host == "linear" else (1, channels) + (1,) * (x.dim() - 2)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"lycoris_0.weight": shape, "lycoris_0.on_input": ()}
    assert tensors["lycoris_0.on_input"].dtype == torch.int64 and int(tensors["lycoris_0.on_input"]) == SIDES[side]
    loaded = load_network(fresh, tmp_path / "a.safetensors")
    assert torch.equal(bits(loaded.adapters["0"].weight), bits(adapter.weight))
    assert loaded.adapters["0"].on_input == SIDES[side]
    assert torch.equal(bits(fresh(x)), bits(expected))
    assert not torch.equal(base(x), expected)


def test_ia3_file_validation_names_the_key(tmp_path):
    model, _ = make_host("linear")
    good = {"lycoris_0.weight": torch.zeros(80), "lycoris_0.on_input": torch.tensor(0)}
    cases = [
        ({"lycoris_0.on_input": torch.tensor(2)}, IncompatibleFileError, "lycoris_0.on_input"),
        ({"lycoris_0.on_input": torch.tensor([0, 1])}, IncompatibleFileError, "lycoris_0.on_input"),
        ({"lycoris_0.on_input": torch.tensor(1)}, ShapeMismatchError, "lycoris_0.weight"),  # (80,) is not (in,)
        ({"lycoris_0.weight": torch.zeros(1, 80)}, ShapeMismatchError, "lycoris_0.weight"),
    ]
    for change, error, key in cases:
        path = tmp_path / "bad.safetensors"
        write_safetensors(path, {**good, **change}, {})
        with pytest.raises(error) as info:
            load_network(model, path)
        assert key in info.value.keys and key in str(info.value)
    write_safetensors(tmp_path / "bad.safetensors", {"lycoris_0.weight": torch.zeros(80)}, {})
    with pytest.raises(IncompatibleFileError, match="lycoris_0.on_input"):
        load_network(model, tmp_path / "bad.safetensors")
    assert "forward" not in model[0].__dict__  # nothing was attached


# ----------------------------------------------------------------------------- (IA)³: lycoris-lora 4.1.3


@pytest.fixture
def lycoris():
    return pytest.importorskip("lycoris")


def lycoris_ia3(model: nn.Module, on_input: bool, bypass: bool = False):
    """An lycoris-lora IA³ network on every layer. `create_lycoris` drops `train_on_input` (see
    test_create_lycoris_ignores_train_on_input), so the input side is built with LycorisNetwork."""
    from lycoris import create_lycoris
    from lycoris.config import PRESET
    from lycoris.wrapper import LycorisNetwork

    if not on_input:
        net = create_lycoris(model, 1.0, algo="ia3", preset="full", bypass_mode=bypass)
    else:
        LycorisNetwork.apply_preset(PRESET["full"])
        net = LycorisNetwork(model, network_module="ia3", train_on_input=True, bypass_mode=bypass)
    net.apply_to()
    randomize(net, std=0.3, seed=11)
    return net


def test_create_lycoris_ignores_train_on_input(lycoris):
    """Upstream fact: lycoris' `create_lycoris` does not forward `train_on_input` to its modules."""
    from lycoris import create_lycoris

    model, _ = make_host("linear")
    net = create_lycoris(model, 1.0, algo="ia3", preset="full", train_on_input=True)
    assert [(lora.train_input, tuple(lora.weight.shape)) for lora in net.loras] == [(False, (80,))]


@pytest.mark.parametrize("side", sorted(SIDES))
def test_lycoris_ia3_file_loads_into_ours_with_the_same_delta_and_forward(tmp_path, lycoris, host_name, side):
    model, x = make_host(host_name)
    ours = copy.deepcopy(model)
    theirs = lycoris_ia3(model, SIDES[side], bypass=True)  # its bypass forward is correct on any host
    (lora,) = theirs.loras
    with torch.no_grad():
        expected = model(x)
    theirs.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    net = load_network(ours, tmp_path / "l.safetensors")
    adapter = net.adapters["0"]
    assert adapter.on_input == SIDES[side]
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        if SIDES[side] and getattr(model[0], "groups", 1) > 1:
            # Upstream defect: its input-side ΔW broadcasts (1, in) against (out, in/groups).
            with pytest.raises(RuntimeError, match="must match"):
                lora.get_diff_weight()
        else:
            torch.testing.assert_close(adapter.delta_weight(), lora.get_diff_weight()[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("host", ["linear", "conv2d-k3"])
def test_lycoris_ia3_bias_bug_and_ours_agrees_with_itself(tmp_path, lycoris, host):
    """LyCORIS 4.1.3 scales the bias in its bypass forward but not in its merge (nor its default
    forward). Ours: Δb = b ⊙ l in every path, equal to its bypass forward and to peft's rule."""
    model, x = make_host(host)
    ours = copy.deepcopy(model)
    theirs = lycoris_ia3(model, False, bypass=True)
    vec = theirs.loras[0].weight.detach().reshape(-1)
    conv, linear = model[0], host == "linear"
    with torch.no_grad():
        bypass = model(x)
        theirs.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
        theirs.merge_to(1.0)
        theirs.restore()
        merged = conv(x)
    bias_term = on_channels(conv.bias.detach() * vec, bypass, linear)
    torch.testing.assert_close(bypass - merged, bias_term.expand_as(bypass), rtol=1e-4, atol=1e-5)
    assert (bypass - merged).abs().max() > 1e-2

    net = load_network(ours, tmp_path / "l.safetensors")
    with torch.no_grad():
        for mode in ("bypass", "rebuild"):
            net.set_forward_mode(mode)
            torch.testing.assert_close(ours(x), bypass, rtol=1e-5, atol=1e-5)
        unmerged = ours(x)
        net.merge()
        assert torch.equal(ours(x), unmerged)


def test_lycoris_cannot_reload_its_own_ia3_file_but_we_can(tmp_path, lycoris):
    from lycoris import create_lycoris_from_weights

    model, x = make_host("conv2d-k3")
    ours, again = copy.deepcopy(model), copy.deepcopy(model)
    theirs = lycoris_ia3(model, False, bypass=True)
    with torch.no_grad():
        expected = model(x)
    theirs.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    tensors, _ = read_safetensors(tmp_path / "l.safetensors")
    assert tensors["lycoris_0.on_input"].dtype == torch.float32  # save_weights casts every tensor
    with pytest.raises(TypeError, match="make_module_from_state_dict"):
        create_lycoris_from_weights(1.0, str(tmp_path / "l.safetensors"), again)
    load_network(ours, tmp_path / "l.safetensors")
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- (IA)³: peft 0.21.2

PEFT_HOSTS = sorted(h for h in HOSTS if h.startswith(("linear", "conv2d", "conv3d")))  # peft has no nn.Conv1d


@pytest.mark.parametrize("side", sorted(SIDES))
@pytest.mark.parametrize("host", PEFT_HOSTS)
def test_peft_ia3_parity(host, side):
    """peft's l is multiplicative, initialised to 1: ours = peft − 1. Its feed-forward layers are
    our input side. Same unmerged forward, same merged weight and bias."""
    pytest.importorskip("peft")
    from peft import IA3Config, inject_adapter_in_model

    model, x = make_host(host)
    ours = copy.deepcopy(model)
    config = IA3Config(target_modules=["0"], feedforward_modules=["0"] if SIDES[side] else [])
    theirs = inject_adapter_in_model(config, model)
    layer = theirs[0]
    assert layer.is_feedforward == SIDES[side]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        peft_l = layer.ia3_l["default"]
        peft_l.copy_(1 + 0.3 * torch.randn(peft_l.shape, generator=g))
        expected = theirs(x)
    net = create_network(ours, algo="ia3", train_on_input=SIDES[side])
    adapter = net.adapters["0"]
    with torch.no_grad():
        adapter.weight.copy_((peft_l - 1).reshape(adapter.weight.shape))
        for mode in ("bypass", "rebuild"):
            net.set_forward_mode(mode)
            torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    baked = net.bake()
    layer.merge()
    torch.testing.assert_close(baked["0.weight"], layer.base_layer.weight, rtol=1e-6, atol=1e-7)
    if layer.base_layer.bias is not None:
        torch.testing.assert_close(baked["0.bias"], layer.base_layer.bias, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- full / diff


def full_net(host: str, dtype=torch.float64, seed: int = 4, **kwargs):
    model, x = make_host(host, dtype)
    net = create_network(model, algo="full", **kwargs)
    randomize(net, seed=seed)
    (adapter,) = net.adapters.values()
    return model, x, net, adapter


def test_full_forward_is_the_layer_on_the_shifted_weight(host_name):
    model, x, net, adapter = full_net(host_name, multiplier=0.7)
    conv = model[0]
    assert adapter.diff.shape == conv.weight.shape and not has_fast_path(adapter)
    assert (adapter.diff_b is None) == (conv.bias is None)
    assert torch.equal(adapter.delta_weight(), adapter.diff) and adapter.delta_bias() is adapter.diff_b
    bias = None if conv.bias is None else conv.bias + 0.7 * adapter.diff_b
    expected = reference_op(conv, x, conv.weight + 0.7 * adapter.diff, bias)
    for mode in ("rebuild", "bypass", "auto"):  # no bypass: every mode rebuilds
        net.set_forward_mode(mode)
        y = model(x)
        assert not torch.allclose(y, reference_op(conv, x, conv.weight, conv.bias))
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("host", ["linear", "linear-nobias", "conv2d-groups2", "conv3d-k3", "conv2d-reflect"])
def test_full_sgd_steps_equal_plain_fine_tuning(host):
    """The oracle: training `diff`/`diff_b` is training W/b. Three SGD steps (momentum, weight
    decay off) of both give the same effective weights and the same losses."""
    model, x = make_host(host, torch.float64)
    plain = copy.deepcopy(model)
    net = create_network(model, algo="full")
    model.requires_grad_(False)
    target = torch.randn_like(plain(x), generator=torch.Generator().manual_seed(9))
    opt_full = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    model.train(), plain.train()
    for _ in range(3):
        for m, opt in ((model, opt_full), (plain, opt_plain)):
            opt.zero_grad()
            loss = (m(x) - target).square().mean()
            loss.backward()
            opt.step()
        torch.testing.assert_close(net.adapters["0"].diff.grad, plain[0].weight.grad, rtol=1e-12, atol=1e-14)
    baked = net.bake()
    torch.testing.assert_close(baked["0.weight"], plain[0].weight.detach(), rtol=1e-12, atol=1e-14)
    if plain[0].bias is not None:
        torch.testing.assert_close(baked["0.bias"], plain[0].bias.detach(), rtol=1e-12, atol=1e-14)
    assert not torch.equal(baked["0.weight"], model[0].weight)
    assert all(p.grad is None for p in model.parameters())


def test_full_rank_dropout_drops_output_rows_in_training_only():
    model, x, net, adapter = full_net("conv2d-k3", rank_dropout=0.5)
    conv = model[0]
    model.eval()
    with torch.no_grad():
        clean = model(x)
        model.train()
        torch.manual_seed(3)
        dropped = model(x)
        torch.manual_seed(3)
        keep = (torch.rand(conv.out_channels) >= 0.5).double()
    expected = reference_op(conv, x, conv.weight + adapter.diff * keep.reshape(-1, 1, 1, 1), conv.bias + adapter.diff_b)
    torch.testing.assert_close(dropped, expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(adapter.delta_weight(), adapter.diff)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), clean)


@pytest.mark.parametrize("host", ["linear", "linear-nobias", "conv2d-groups2", "conv3d-k1"])
def test_full_save_load_merge_are_bit_exact(tmp_path, host):
    model, x, net, adapter = full_net(host, dtype=torch.float32)
    fresh, base = make_host(host)[0], make_host(host)[0]  # the same seeded weights
    weight0 = bits(model[0].weight).clone()
    expected = model(x)
    net.save(tmp_path / "a.safetensors")
    tensors, _ = read_safetensors(tmp_path / "a.safetensors")
    shapes = {"lycoris_0.diff": tuple(model[0].weight.shape)}
    if model[0].bias is not None:
        shapes["lycoris_0.diff_b"] = (model[0].weight.shape[0],)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    loaded = load_network(fresh, tmp_path / "a.safetensors")
    for a, b in zip(loaded.parameters(), net.parameters(), strict=True):
        assert torch.equal(bits(a), bits(b))
    assert torch.equal(bits(fresh(x)), bits(expected)) and not torch.equal(base(x), expected)
    with torch.no_grad():
        net.merge()
        assert torch.equal(bits(model(x)), bits(expected))
        net.unmerge()
    assert torch.equal(bits(model[0].weight), weight0)
    net.set_multiplier(0.0)
    assert torch.equal(model(x), base(x))


def test_full_is_also_called_diff_and_ignores_dim_alpha():
    model, _ = make_host("conv2d-k3")
    net = create_network(model, algo="diff", dim=8, alpha=0.5)
    assert type(net.adapters["0"]) is Full and net.adapters["0"].algo == "full"
    assert sum(p.numel() for p in net.parameters()) == 20 * 12 * 9 + 20


def test_full_file_validation_names_the_key(tmp_path):
    model, _ = make_host("linear-nobias")
    path = tmp_path / "bad.safetensors"
    write_safetensors(path, {"lycoris_0.diff": torch.zeros(80, 48), "lycoris_0.diff_b": torch.zeros(80)}, {})
    with pytest.raises(IncompatibleFileError, match="lycoris_0.diff_b.*has none") as info:
        load_network(model, path)
    assert info.value.keys == ["lycoris_0.diff_b"]
    write_safetensors(path, {"lycoris_0.diff": torch.zeros(48, 80)}, {})
    with pytest.raises(ShapeMismatchError, match="lycoris_0.diff") as info:
        load_network(model, path)
    assert info.value.keys == ["lycoris_0.diff"]
    assert "forward" not in model[0].__dict__
    biased, _ = make_host("linear")
    write_safetensors(path, {"lycoris_0.diff": torch.ones(80, 48)}, {})  # no diff_b: the bias stays
    net = load_network(biased, path)
    assert torch.equal(net.adapters["0"].diff_b, torch.zeros(80))
    write_safetensors(path, {"lycoris_0.diff": torch.ones(80, 48), "lycoris_0.diff_b": torch.ones(79)}, {})
    with pytest.raises(ShapeMismatchError, match="lycoris_0.diff_b"):
        load_network(make_host("linear")[0], path)


@pytest.mark.parametrize("host", sorted(set(HOSTS) - PADDING_MODE_HOSTS))
def test_lycoris_full_file_loads_into_ours(tmp_path, lycoris, host):
    from lycoris import create_lycoris

    model, x = make_host(host)
    ours = copy.deepcopy(model)
    theirs = create_lycoris(model, 1.0, algo="full", preset="full")
    theirs.apply_to()  # its parameters are now the absolute weights; the file holds the difference
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        expected = model(x)
    theirs.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    load_network(ours, tmp_path / "l.safetensors")
    with torch.no_grad():
        assert not torch.allclose(ours(x), reference_op(ours[0], x, ours[0].weight, ours[0].bias))
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("host", sorted(set(HOSTS) - PADDING_MODE_HOSTS))
def test_our_full_file_loads_in_lycoris(tmp_path, lycoris, host):
    """`create_lycoris_from_weights` + `apply_to()` reproduce our forward. (Its usual follow-up,
    `load_state_dict(weights)`, would add the difference a second time — an upstream defect.)"""
    from lycoris import create_lycoris_from_weights

    model, x = make_host(host)
    theirs_model = copy.deepcopy(model)
    net = create_network(model, algo="full")
    randomize(net, seed=6)
    expected = model(x)
    net.save(tmp_path / "ours.safetensors")
    theirs, weights = create_lycoris_from_weights(1.0, str(tmp_path / "ours.safetensors"), theirs_model)
    theirs.apply_to()
    assert len(theirs.loras) == 1
    with torch.no_grad():
        torch.testing.assert_close(theirs_model(x), expected, rtol=1e-5, atol=1e-5)
        if host == "linear":
            theirs.load_state_dict(weights, False)
            doubled = reference_op(model[0], x, model[0].weight + 2 * net.adapters["0"].diff, model[0].bias + 2 * net.adapters["0"].diff_b)
            torch.testing.assert_close(theirs_model(x), doubled, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- (IA)³: the one-multiply output scale


def test_ia3_output_scale_is_one_multiply_stacks_and_mixes_with_additive_adapters():
    """Output-side (IA)³ in bypass is base_out ⊙ (1 + Σ mᵢ·lᵢ): two stacked networks, and a LoRA
    beside them (added on top), against the formula; at init the output is the host's, bit-exact."""
    model, x = make_host("conv2d-k3", torch.float64)
    conv = model[0]
    first = create_network(model, algo="ia3", forward_mode="bypass")
    assert torch.equal(bits(model(x)), bits(reference_op(conv, x, conv.weight, conv.bias)))  # l = 0: exact
    second = create_network(model, algo="ia3", stack=True, forward_mode="bypass", multiplier=0.5)
    lora = create_network(model, algo="lora", dim=2, stack=True, forward_mode="bypass")
    for seed, net in enumerate((first, second, lora)):
        randomize(net, std=0.3, seed=seed)
    l1, l2 = (net.adapters["0"].weight.detach().reshape(1, -1, 1, 1) for net in (first, second))
    base = reference_op(conv, x, conv.weight, conv.bias)
    lora_out = reference_op(conv, x, lora.adapters["0"].delta_weight(), None)
    torch.testing.assert_close(model(x), base * (1 + l1 + 0.5 * l2) + lora_out, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ia3_output_map_keeps_a_small_l_in_half_precision_and_honours_dropout(dtype):
    """base_out + m·base_out ⊙ l: in half precision a small l survives (1 + l rounded to 8–11 bits
    would be 1); with dropout while training, the adapter's share alone is dropped."""
    model, x, net, adapter = ia3_net("linear", False, dtype=dtype, forward_mode="bypass", multiplier=0.7)
    with torch.no_grad():
        adapter.weight.fill_(1e-3)
    base = reference_op(model[0], x, model[0].weight, model[0].bias)
    expected = base.double() * (1 + 0.7 * 1e-3)
    assert not torch.equal(model(x), base)  # the change is there even in bf16
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(model(x).double(), expected, rtol=tol, atol=tol)
    _, _, net2, adapter2 = ia3_net("linear", False, dtype=torch.float32, dropout=0.5, forward_mode="bypass")
    randomize(net2, std=0.3, seed=1)
    vec = adapter2.weight.detach()
    model2 = adapter2.host.module
    x2 = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    plain = reference_op(model2, x2, model2.weight, model2.bias)
    net2.train()
    model2.train()
    torch.manual_seed(5)
    got = model2(x2)
    torch.manual_seed(5)
    share = torch.nn.functional.dropout(plain * vec, 0.5)
    torch.testing.assert_close(got, plain + share, rtol=1e-6, atol=1e-6)
    net2.eval()
    torch.testing.assert_close(model2(x2), plain * (1 + vec), rtol=1e-6, atol=1e-6)


def test_ia3_bypass_saves_one_output_sized_tensor():
    """What autograd keeps per layer: the host output (for l's gradient), nothing else output-sized."""
    model, x, net, adapter = ia3_net("conv2d-k3", False, dtype=torch.float32)
    model.requires_grad_(False)
    out_numel, saved = saved_numels(model, x)
    assert sum(1 for n in saved if n >= out_numel) == 1


@pytest.mark.parametrize("shape, channels", [
    ((5, 7, 6), (6,)),  # Linear: channels last
    ((2, 6, 4, 3), (6, 1, 1)),  # Conv2d, batched
    ((6, 4, 3), (6, 1, 1)),  # Conv2d, unbatched
    ((2, 6, 3, 2, 2), (6, 1, 1, 1)),  # Conv3d
])
@pytest.mark.parametrize("m", [1.0, -0.4])
def test_channel_scale_add_is_the_formula_with_its_gradients(shape, channels, m):
    """`kernels.rescale`: y + m·y ⊙ v and its gradients against the plain float64 formula; without
    autograd the result is written over y."""
    gen = torch.Generator().manual_seed(0)
    y0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    v0 = 0.3 * torch.randn(channels, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    y1, v1 = y0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
    ref = y1 + m * (y1 * v1)
    ref_gy, ref_gv = torch.autograd.grad(ref, [y1, v1], g)
    y2, v2 = y0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
    out = channel_scale_add(y2 * 1.0, v2, m)
    gy, gv = torch.autograd.grad(out, [y2, v2], g)
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(gy, ref_gy, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(gv, ref_gv, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda y, v: channel_scale_add(y, v, m), (y1.detach().requires_grad_(True), v1.detach().requires_grad_(True)))
    with torch.no_grad():
        fresh = y0.clone()
        written = channel_scale_add(fresh, v0, m)
    assert written.data_ptr() == fresh.data_ptr()
    torch.testing.assert_close(written, ref.detach(), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("host", ["linear", "conv2d-k3"])
@pytest.mark.parametrize("switched_off", [False, True], ids=["plain", "a-channel-at-zero"])
def test_ia3_output_map_keeps_the_naive_gradients(host, switched_off):
    """Training in bypass: ∇x and ∇l against the formula in float64 — also with a channel switched
    off (1 + m·l = 0), whose gradient still reaches l."""
    model, x, net, adapter = ia3_net(host, False, multiplier=0.5)
    model.requires_grad_(False)
    if switched_off:
        with torch.no_grad():
            adapter.weight.view(-1)[1] = -2.0  # 1 + 0.5·(−2) = 0
    x = x.clone().requires_grad_(True)
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gx, gl = torch.autograd.grad(y, [x, adapter.weight], g)

    x2 = x.detach().clone().requires_grad_(True)
    l2 = adapter.weight.detach().clone().requires_grad_(True)
    base = reference_op(model[0], x2, model[0].weight, model[0].bias)
    ref = base * (1 + 0.5 * (l2 if host == "linear" else l2.reshape(1, -1, 1, 1)))
    ref_gx, ref_gl = torch.autograd.grad(ref, [x2, l2], g)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gl.reshape(-1), ref_gl.reshape(-1), rtol=1e-10, atol=1e-12)
    assert gl.reshape(-1)[1] != 0
