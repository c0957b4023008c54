"""LoHa against naive formulas written here, its autograd kernels, and lycoris-lora 4.1.3 / peft 0.21.2."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lycoris_like.modules.loha  # noqa: F401  (registers "loha")
from lycoris_like import IncompatibleFileError, ShapeMismatchError, create_network, load_network, network_from_tensors
from lycoris_like.hosts import HostLayer
from lycoris_like.kernels.hadamard import (
    HadamardProduct,
    HadamardTuckerProduct,
    hadamard_delta,
    hadamard_tucker_delta,
    khatri_rao_factors,
)
from lycoris_like.modules.loha import LoHa

from conftest import HOSTS, fast, has_fast_path, make_host, randomize, reference_op

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
logging.getLogger("lycoris").setLevel(logging.ERROR)

VARIANTS = {
    "plain": {},
    "tucker": {"use_tucker": True},
    "scalar": {"use_scalar": True},
    "rslora": {"rs_lora": True},
}
# lycoris-lora 4.1.3 applies its delta with zero padding whatever the host's padding_mode.
PADDING_MODE_HOSTS = {"conv2d-reflect", "conv2d-circular"}
LYCORIS_HOSTS = sorted(set(HOSTS) - PADDING_MODE_HOSTS)


# ----------------------------------------------------------------------------- naive references


def naive_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (out, r) · b (r, n) as an explicit sum of r outer products."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype)
    for j in range(a.shape[1]):
        out += a[:, j : j + 1] * b[j : j + 1, :]
    return out


def naive_tucker_factor(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """F[o, i, k…] = Σ_{p,q} t[p, q, k…]·a[p, o]·b[q, i] by explicit loops over the core."""
    k = t.shape[2:]
    ones = [1] * len(k)
    out = torch.zeros(a.shape[1], b.shape[1], *k, dtype=a.dtype)
    for p in range(t.shape[0]):
        for q in range(t.shape[1]):
            out += a[p].reshape(-1, 1, *ones) * b[q].reshape(1, -1, *ones) * t[p, q].reshape(1, 1, *k)
    return out


def naive_loha(tensors: dict[str, torch.Tensor], scale: float, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW = scale·(w1a·w1b) ⊙ (w2a·w2b) from file-layout tensors, reshaped (C order) to `shape`."""
    if "hada_t1" in tensors:
        f1 = naive_tucker_factor(tensors["hada_t1"], tensors["hada_w1_a"], tensors["hada_w1_b"])
        f2 = naive_tucker_factor(tensors["hada_t2"], tensors["hada_w2_a"], tensors["hada_w2_b"])
    else:
        f1 = naive_product(tensors["hada_w1_a"], tensors["hada_w1_b"].reshape(tensors["hada_w1_b"].shape[0], -1))
        f2 = naive_product(tensors["hada_w2_a"], tensors["hada_w2_b"].reshape(tensors["hada_w2_b"].shape[0], -1))
    return (scale * f1 * f2).reshape(shape)


def factors_of(adapter: LoHa) -> dict[str, torch.Tensor]:
    """The adapter's parameters, with the scalar folded into w1_a by hand."""
    out = {k: getattr(adapter, k).detach() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    if adapter.scalar is not None:
        out["hada_w1_a"] = out["hada_w1_a"] * adapter.scalar.detach()
    if adapter.hada_t1 is not None:
        out["hada_t1"], out["hada_t2"] = adapter.hada_t1.detach(), adapter.hada_t2.detach()
    return out


def expected_scale(dim: int, alpha: float, rs_lora: bool) -> float:
    """α/r, or α/√r for rs-LoRA computed from the float32 α·√r a file stores (so it round-trips)."""
    if rs_lora:
        return torch.tensor(alpha * math.sqrt(dim), dtype=torch.float32).item() / dim
    return alpha / dim


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def loha_net(model: nn.Module, **kwargs):
    return create_network(model, algo="loha", **kwargs)


# ----------------------------------------------------------------------------- ΔW and forward


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_delta_weight_matches_naive_formula(host_name, variant):
    model, _ = make_host(host_name, torch.float64)
    net = loha_net(model, dim=3, alpha=2, **VARIANTS[variant])
    randomize(net, std=0.5, seed=3)
    (adapter,) = net.adapters.values()
    host = model[0]
    wide = host.weight[0, 0].numel() > 1
    assert adapter.tucker == (variant == "tucker" and wide)
    expected = naive_loha(factors_of(adapter), expected_scale(3, 2.0, variant == "rslora"), tuple(host.weight.shape))
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(adapter.delta_weight(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["rebuild", "bypass"])
@pytest.mark.parametrize("variant", ["plain", "tucker", "scalar"])
def test_forward_matches_naive_layer_maths(host_name, variant, mode):
    model, x = make_host(host_name, torch.float64)
    net = loha_net(model, dim=3, alpha=2, multiplier=0.7, forward_mode=mode, **VARIANTS[variant])
    randomize(net, std=0.5, seed=4)
    (adapter,) = net.adapters.values()
    host = model[0]
    # The bypass exists for ungrouped, non-Tucker hosts; elsewhere "bypass" falls back to rebuild.
    assert has_fast_path(adapter) == (getattr(host, "groups", 1) == 1 and not adapter.tucker)
    delta = naive_loha(factors_of(adapter), expected_scale(3, 2.0, variant == "rslora"), tuple(host.weight.shape))
    expected = reference_op(host, x, host.weight + 0.7 * delta)
    y = model(x)
    assert rel_err(y, reference_op(host, x, host.weight)) > 1e-3
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ["plain", "tucker", "scalar"])
def test_identity_at_init_is_exact_with_the_lycoris_init(variant):
    model, x = make_host("conv2d-k3")
    base = model(x)
    net = loha_net(model, dim=4, alpha=1, **VARIANTS[variant])
    (adapter,) = net.adapters.values()
    assert torch.equal(adapter.delta_weight(), torch.zeros_like(model[0].weight))
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        assert torch.equal(model(x), base)
    # LyCORIS init: w1_b, w2_b ~ N(0, 1); w1_a ~ N(0, 0.1); w2_a = 0 (N(0, 0.1) with use_scalar).
    big = loha_net(nn.Sequential(nn.Linear(300, 400)), dim=8, **VARIANTS[variant])
    (a,) = big.adapters.values()
    assert abs(a.hada_w1_b.std().item() - 1.0) < 0.05 and abs(a.hada_w2_b.std().item() - 1.0) < 0.05
    assert abs(a.hada_w1_a.std().item() - 0.1) < 0.01
    if variant == "scalar":
        assert abs(a.hada_w2_a.std().item() - 0.1) < 0.01 and a.scalar.item() == 0.0
    else:
        assert not a.hada_w2_a.any()
    if variant == "tucker":
        assert abs(adapter.hada_t1.std().item() - 0.1) < 0.05 and adapter.hada_t1.shape == (4, 4, 3, 3)


def test_khatri_rao_factors_rebuild_the_hadamard_product():
    g = torch.Generator().manual_seed(0)
    a1, a2 = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 2, generator=g, dtype=torch.float64)
    b1, b2 = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    up, down = khatri_rao_factors(a1, b1, a2, b2)
    assert up.shape == (7, 6) and down.shape == (6, 5)
    torch.testing.assert_close(naive_product(up, down), naive_product(a1, b1) * naive_product(a2, b2))


def test_cost_model_picks_bypass_for_training_and_small_inputs_only():
    model = nn.Sequential(nn.Linear(320, 320))
    net = loha_net(model, dim=4)
    (adapter,) = net.adapters.values()
    # bypass ≈ tokens·r²·(in + out); rebuilding ΔW ≈ 2·r·|W| + |W|
    assert adapter.bypass_flops(1000) >= 1000 * 16 * 640
    assert adapter.rebuild_flops() >= 2 * 4 * 320 * 320
    small, large = torch.randn(2, 320), torch.randn(64, 64, 320)
    with torch.no_grad():
        assert fast(adapter, small) and not fast(adapter, large)
    assert fast(adapter, large)  # training: rebuilding also forms the full weight gradient
    grouped = loha_net(nn.Sequential(nn.Conv2d(8, 8, 3, groups=2)), dim=4)
    tucker = loha_net(nn.Sequential(nn.Conv2d(8, 8, 3)), dim=4, use_tucker=True)
    for a in (*grouped, *tucker):
        assert not has_fast_path(a) and not fast(a, torch.randn(1, 8, 4, 4))


# ----------------------------------------------------------------------------- autograd kernels


def _inputs(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


def test_hadamard_function_gradcheck_and_matches_naive_autograd():
    a1, b1, a2, b2 = _inputs([(5, 3), (3, 6), (5, 3), (3, 6)], seed=0)
    assert torch.autograd.gradcheck(lambda *t: HadamardProduct.apply(*t, 0.7), (a1, b1, a2, b2))
    weight = torch.randn(5, 6, dtype=torch.float64)
    got = torch.autograd.grad((hadamard_delta(a1, b1, a2, b2, 0.7) * weight).sum(), (a1, b1, a2, b2))
    ref = torch.autograd.grad((0.7 * naive_product(a1, b1) * naive_product(a2, b2) * weight).sum(), (a1, b1, a2, b2))
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    # only some inputs needing a gradient
    frozen = [t.detach() for t in (a1, b1)]
    (g,) = torch.autograd.grad((hadamard_delta(*frozen, a2, b2.detach(), 0.7) * weight).sum(), (a2,))
    torch.testing.assert_close(g, ref[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", [(3,), (3, 2), (2, 2, 2)])
def test_hadamard_tucker_function_gradcheck_and_matches_naive_autograd(kernel):
    r, out, inp = 2, 4, 3
    shapes = [(r, r, *kernel), (r, out), (r, inp)] * 2
    t1, a1, b1, t2, a2, b2 = inputs = _inputs(shapes, seed=1)
    assert torch.autograd.gradcheck(lambda *t: HadamardTuckerProduct.apply(*t, 1.3), tuple(inputs))
    weight = torch.randn(out, inp, *kernel, dtype=torch.float64)
    got = torch.autograd.grad((hadamard_tucker_delta(*inputs, 1.3) * weight).sum(), inputs)
    naive = 1.3 * naive_tucker_factor(t1, a1, b1) * naive_tucker_factor(t2, a2, b2)
    ref = torch.autograd.grad((naive * weight).sum(), inputs)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-11)
    frozen = [t.detach() for t in inputs]
    frozen[1] = a1  # only hada_w1_a needs a gradient
    (g,) = torch.autograd.grad((hadamard_tucker_delta(*frozen, 1.3) * weight).sum(), (a1,))
    torch.testing.assert_close(g, ref[1], rtol=1e-11, atol=1e-11)


def test_hadamard_function_saves_only_the_factors():
    a1, b1, a2, b2 = _inputs([(40, 2), (2, 50), (40, 2), (2, 50)], seed=2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        hadamard_delta(a1, b1, a2, b2, 0.5)
    assert sorted(saved) == sorted([a1.shape, b1.shape, a2.shape, b2.shape])
    t = _inputs([(2, 2, 3, 3), (2, 40), (2, 50)] * 2, seed=3)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        hadamard_tucker_delta(*t, 0.5)
    assert sorted(saved) == sorted(x.shape for x in t)


def test_peft_tucker_backward_is_wrong_and_ours_is_not():
    """Documents an upstream defect: peft 0.21.2's HadaWeightCP backward contracts the other
    factor's Tucker chain for hada_w1_a / hada_w2_a (lycoris-lora 4.1.3 fixed this)."""
    peft_layer = pytest.importorskip("peft.tuners.loha.layer")
    inputs = _inputs([(3, 3, 3, 3), (3, 5), (3, 4)] * 2, seed=4)
    weight = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    ours = torch.autograd.grad((hadamard_tucker_delta(*inputs, 0.5) * weight).sum(), inputs)
    theirs = torch.autograd.grad((peft_layer.make_weight_cp(*inputs, scale=torch.tensor(0.5)) * weight).sum(), inputs)
    naive = 0.5 * naive_tucker_factor(*inputs[:3]) * naive_tucker_factor(*inputs[3:])
    ref = torch.autograd.grad((naive * weight).sum(), inputs)
    for i, (o, t, r) in enumerate(zip(ours, theirs, ref)):
        torch.testing.assert_close(o, r, rtol=1e-11, atol=1e-11)
        assert (rel_err(t, r) > 1e-2) == (i in (1, 4))  # hada_w1_a, hada_w2_a


# ----------------------------------------------------------------------------- options


def test_rank_dropout_masks_output_rows_in_training_only():
    model, x = make_host("conv2d-k3")
    net = loha_net(model, dim=4, rank_dropout=0.5, rank_dropout_scale=True)
    randomize(net, std=0.5, seed=6)
    (adapter,) = net.adapters.values()
    full = adapter.delta_weight().detach()
    net.eval()
    assert torch.equal(adapter.delta_weight(True), full)  # eval: no mask
    net.train()
    model.eval()
    assert torch.equal(adapter.delta_weight(True), full)  # the host must train too
    model.train()
    torch.manual_seed(0)
    masked = adapter.delta_weight(True).detach()
    assert torch.equal(adapter.delta_weight(), full)  # never in delta_weight/merges
    kept = [bool(row.any()) for row in masked]
    assert 0 < sum(kept) < len(kept)
    for row, keep, ref in zip(masked, kept, full):
        if keep:  # a whole output row kept and rescaled by 1/(1-p)
            torch.testing.assert_close(row, 2 * ref)
    # The bypass masks the same axis: output channels.
    torch.manual_seed(0)
    contribution = adapter.bypass(x, True).detach()
    net.eval()
    reference = adapter.bypass(x, True).detach()
    channel_kept = [bool(c.any()) for c in contribution.transpose(0, 1)]
    assert 0 < sum(channel_kept) < len(channel_kept)
    for c, keep, ref in zip(contribution.transpose(0, 1), channel_kept, reference.transpose(0, 1)):
        if keep:
            torch.testing.assert_close(c, 2 * ref, rtol=1e-5, atol=1e-6)


def test_use_scalar_is_folded_into_w1_a_on_save(tmp_path):
    model, x = make_host("linear")
    net = loha_net(model, dim=4, alpha=2, use_scalar=True)
    (adapter,) = net.adapters.values()
    assert torch.equal(adapter.delta_weight(), torch.zeros_like(model[0].weight))
    randomize(net, std=0.5, seed=7)
    with torch.no_grad():
        adapter.scalar.fill_(0.3)
    y = model(x)
    tensors = adapter.file_tensors()
    assert "scalar" not in tensors
    torch.testing.assert_close(tensors["hada_w1_a"], adapter.hada_w1_a.detach() * 0.3)
    path = net.save(tmp_path / "s.safetensors")
    fresh, _ = make_host("linear")
    loaded = load_network(fresh, path)
    (back,) = loaded.adapters.values()
    assert back.scalar is None
    assert torch.equal(back.delta_weight(), adapter.delta_weight())
    assert torch.equal(fresh(x), y)


def test_rs_lora_stores_alpha_times_sqrt_rank_like_lycoris(tmp_path):
    from lycoris import create_lycoris_from_weights
    from lycoris.modules.loha import LohaModule

    model, x = make_host("conv2d-k3")
    net = loha_net(model, dim=4, alpha=3, rs_lora=True)
    randomize(net, std=0.5, seed=8)
    (adapter,) = net.adapters.values()
    assert adapter.scale == pytest.approx(3 / 2) and adapter.file_tensors()["alpha"].item() == pytest.approx(6.0)
    lyco = LohaModule("lycoris_0", nn.Conv2d(12, 20, 3, padding=1), 1.0, 4, 3, rs_lora=True)
    assert lyco.alpha.item() == pytest.approx(6.0) and lyco.scale == pytest.approx(1.5)
    # any reader computing alpha / rank recovers γ = α/√r from our file
    path = net.save(tmp_path / "rs.safetensors")
    fresh, _ = make_host("conv2d-k3")
    (back,) = load_network(fresh, path).adapters.values()
    assert back.scale == adapter.scale and torch.equal(fresh(x), model(x))
    theirs_model, _ = make_host("conv2d-k3")
    theirs, weights = create_lycoris_from_weights(1.0, str(path), theirs_model)
    theirs.apply_to()
    theirs.load_state_dict(weights, False)
    assert theirs.loras[0].scale == pytest.approx(1.5)
    assert rel_err(theirs_model(x), model(x)) <= 1e-5


# ----------------------------------------------------------------------------- files


def test_file_layout_matches_formats_md():
    model = nn.Sequential(nn.Linear(48, 80), nn.Conv2d(12, 20, 3), nn.Conv2d(12, 20, (3, 1)))
    plain = {path: a.file_tensors() for path, a in loha_net(model, dim=4).adapters.items()}
    assert {k: tuple(v.shape) for k, v in plain["0"].items()} == {
        "hada_w1_a": (80, 4), "hada_w1_b": (4, 48), "hada_w2_a": (80, 4), "hada_w2_b": (4, 48), "alpha": ()}
    assert {k: tuple(v.shape) for k, v in plain["1"].items()} == {
        "hada_w1_a": (20, 4), "hada_w1_b": (4, 108), "hada_w2_a": (20, 4), "hada_w2_b": (4, 108), "alpha": ()}
    tucker = {p: a.file_tensors() for p, a in loha_net(model, dim=4, use_tucker=True, stack=True).adapters.items()}
    assert {k: tuple(v.shape) for k, v in tucker["2"].items()} == {
        "hada_w1_a": (4, 20), "hada_w1_b": (4, 12), "hada_w2_a": (4, 20), "hada_w2_b": (4, 12),
        "hada_t1": (4, 4, 3, 1), "hada_t2": (4, 4, 3, 1), "alpha": ()}
    assert set(tucker["0"]) == set(plain["0"])  # no core on a Linear
    assert all(t["alpha"].dtype == torch.float32 for t in (*plain.values(), *tucker.values()))


@pytest.mark.parametrize("variant", ["plain", "tucker", "dora_in"])
def test_save_load_is_bit_exact(tmp_path, variant):
    model, x = make_host("conv2d-k3")
    kwargs = {"plain": {}, "tucker": {"use_tucker": True}, "dora_in": {"weight_decompose": True, "wd_on_out": False}}
    net = loha_net(model, dim=4, alpha=2, **kwargs[variant])
    randomize(net, std=0.5, seed=9)
    y = model(x)
    fresh, _ = make_host("conv2d-k3")
    (back,) = load_network(fresh, net.save(tmp_path / "a.safetensors")).adapters.values()
    (adapter,) = net.adapters.values()
    assert torch.equal(back.delta_weight(), adapter.delta_weight())
    assert torch.equal(fresh(x), y)
    assert back.tucker == adapter.tucker and getattr(back, "wd_on_out", None) == getattr(adapter, "wd_on_out", None)
    assert type(back) is type(adapter)  # the DoRA variant comes back as itself


def _file(host_name: str, variant: str = "plain") -> dict[str, torch.Tensor]:
    model, _ = make_host(host_name)
    net = loha_net(model, dim=4, alpha=2, **VARIANTS[variant])
    randomize(net, std=0.5, seed=10)
    return net.file_state_dict()


@pytest.mark.parametrize(
    "edit, error, key",
    [
        (lambda t: t.update({"lycoris_0.hada_w1_a": torch.zeros(20, 5)}), ShapeMismatchError, "lycoris_0.hada_w1_a"),
        (lambda t: t.update({"lycoris_0.hada_w2_b": torch.zeros(3, 108)}), ShapeMismatchError, "lycoris_0.hada_w2_b"),
        (lambda t: t.update({"lycoris_0.hada_w1_b": torch.zeros(4, 12, 3)}), ShapeMismatchError, "lycoris_0.hada_w1_b"),
        (lambda t: t.pop("lycoris_0.hada_w2_a"), IncompatibleFileError, "lycoris_0.hada_w2_a"),
        (lambda t: t.update({"lycoris_0.alpha": torch.tensor([1.0, 2.0])}), IncompatibleFileError, "lycoris_0.alpha"),
        (lambda t: t.update({"lycoris_0.hada_t1": torch.zeros(4, 4, 3, 3)}), IncompatibleFileError, "lycoris_0.hada_t2"),
    ],
)
def test_bad_files_raise_typed_errors_naming_the_key(edit, error, key):
    tensors = _file("conv2d-k3")
    edit(tensors)
    model, x = make_host("conv2d-k3")
    before = model(x)
    with pytest.raises(error) as info:
        network_from_tensors(model, tensors)
    assert key in str(info.value) and key in info.value.keys
    assert torch.equal(model(x), before)


def test_bad_tucker_core_shape_is_named():
    tensors = _file("conv2d-k3", "tucker")
    tensors["lycoris_0.hada_t2"] = torch.zeros(4, 4, 3, 2)
    with pytest.raises(ShapeMismatchError, match=r"lycoris_0\.hada_t2"):
        network_from_tensors(make_host("conv2d-k3")[0], tensors)


def test_unusual_layouts_load_with_the_naive_delta():
    """A conv w_b stored unflattened (r, in, k…), and a Tucker core on a pointwise host (folded)."""
    tensors = {k.split(".", 1)[1]: v.double() for k, v in _file("conv2d-k3").items()}
    host = HostLayer.of(make_host("conv2d-k3", torch.float64)[0][0])
    unflat = {**tensors, "hada_w1_b": tensors["hada_w1_b"].reshape(4, 12, 3, 3)}
    module = LoHa.from_file_tensors(host, unflat, "x")
    torch.testing.assert_close(module.delta_weight(), naive_loha(tensors, 0.5, (20, 12, 3, 3)), rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(11)
    core = {"hada_t1": (4, 4, 1, 1), "hada_t2": (4, 4, 1, 1), "hada_w1_a": (4, 20), "hada_w2_a": (4, 20),
            "hada_w1_b": (4, 12), "hada_w2_b": (4, 12)}
    tensors = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in core.items()}
    host = HostLayer.of(make_host("conv2d-k1", torch.float64)[0][0])
    module = LoHa.from_file_tensors(host, {**tensors, "alpha": torch.tensor(2.0)}, "x")
    assert not module.tucker
    torch.testing.assert_close(module.delta_weight(), naive_loha(tensors, 0.5, (20, 12, 1, 1)), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- lycoris-lora 4.1.3

LYCORIS_VARIANTS = {"plain": {}, "tucker": {"use_tucker": True}, "dora": {"dora_wd": True}}


@pytest.mark.parametrize("variant", sorted(LYCORIS_VARIANTS))
@pytest.mark.parametrize("host", LYCORIS_HOSTS)
def test_lycoris_file_loads_into_ours_with_their_forward(tmp_path, host, variant):
    from lycoris import create_lycoris

    model, x = make_host(host)
    ours = copy.deepcopy(model)
    theirs = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo="loha", preset="full",
                            **LYCORIS_VARIANTS[variant])
    theirs.apply_to()
    randomize(theirs, std=0.5, seed=12)
    expected = model(x)
    assert rel_err(expected, ours(x)) > 1e-3
    theirs.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    net = load_network(ours, tmp_path / "l.safetensors")
    (adapter,) = net.adapters.values()
    assert isinstance(adapter, LoHa)
    assert adapter.tucker == (variant == "tucker" and model[0].weight[0, 0].numel() > 1)
    assert (getattr(adapter, "dora_scale", None) is not None) == (variant == "dora")
    assert rel_err(ours(x), expected) <= 1e-5


@pytest.mark.parametrize("variant", ["plain", "tucker", "dora"])
@pytest.mark.parametrize("host", LYCORIS_HOSTS)
def test_our_file_loads_in_lycoris_with_our_forward(tmp_path, host, variant):
    from lycoris import create_lycoris_from_weights

    model, x = make_host(host)
    theirs_model = copy.deepcopy(model)
    options = {"plain": {}, "tucker": {"use_tucker": True}, "dora": {"weight_decompose": True}}[variant]
    net = loha_net(model, dim=4, alpha=2, **options)
    randomize(net, std=0.5, seed=13)
    expected = model(x)
    net.save(tmp_path / "ours.safetensors")
    theirs, weights = create_lycoris_from_weights(1.0, str(tmp_path / "ours.safetensors"), theirs_model)
    theirs.apply_to()
    result = theirs.load_state_dict(weights, False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "scalar" not in k]
    (lyco,) = theirs.loras
    assert type(lyco).__name__ == "LohaModule"
    assert rel_err(theirs_model(x), expected) <= 1e-5


def test_lycoris_rs_lora_and_scalar_modules_load_into_ours(tmp_path):
    from lycoris.modules.loha import LohaModule
    from safetensors.torch import save_file

    model, x = make_host("conv2d-k3")
    ours = copy.deepcopy(model)
    lyco = LohaModule("lycoris_0", model[0], 1.0, 4, 3, use_tucker=True, use_scalar=True, rs_lora=True)
    lyco.apply_to()
    randomize(lyco, std=0.5, seed=14)
    expected = model(x)
    save_file({f"lycoris_0.{k}": v.detach().contiguous() for k, v in lyco.custom_state_dict().items()},
              str(tmp_path / "l.safetensors"))
    (adapter,) = load_network(ours, tmp_path / "l.safetensors").adapters.values()
    assert adapter.tucker and adapter.scale == pytest.approx(3 / 2)
    assert rel_err(ours(x), expected) <= 1e-5


def test_lycoris_merge_applies_gamma_twice_and_ours_does_not(tmp_path):
    """Regression for an upstream defect: lycoris-lora 4.1.3's LoHa `get_diff_weight`/`merge_to`
    multiply by γ = α/r twice, so its merged model is not the model it trained."""
    from lycoris import create_lycoris

    model, x = make_host("linear")
    ours = copy.deepcopy(model)
    theirs = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo="loha", preset="full")
    theirs.apply_to()
    randomize(theirs, std=0.5, seed=15)
    (lyco,) = theirs.loras
    gamma = 0.5
    expected = model(x)  # their forward
    tensors = {k: v.detach().double() for k, v in lyco.custom_state_dict().items()}
    delta = naive_loha(tensors, gamma, tuple(model[0].weight.shape)).float()
    assert rel_err(expected, reference_op(model[0], x, model[0].weight + delta)) <= 1e-5
    torch.testing.assert_close(lyco.get_diff_weight()[0], gamma * delta, rtol=1e-5, atol=1e-6)
    theirs.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    weight = model[0].weight.detach().clone()
    with torch.no_grad():
        lyco.merge_to(1.0)
    torch.testing.assert_close(model[0].weight.detach() - weight, gamma * delta, rtol=1e-4, atol=1e-6)
    assert rel_err(F.linear(x, model[0].weight, model[0].bias), expected) > 1e-2

    net = load_network(ours, tmp_path / "l.safetensors", multiplier=1.0)
    net.set_forward_mode("rebuild")
    unmerged = ours(x)
    assert rel_err(unmerged, expected) <= 1e-5
    net.merge()
    torch.testing.assert_close(ours[0].weight.detach() - weight, delta, rtol=1e-4, atol=1e-6)
    assert torch.equal(ours(x), unmerged)


# ----------------------------------------------------------------------------- peft 0.21.2

PEFT_HOSTS = ["linear", "linear-nobias", "conv1d-k1", "conv1d-k3", "conv2d-k1", "conv2d-k3", "conv2d-k3x1",
              "conv2d-stride2", "conv2d-groups2"]


@pytest.mark.parametrize("effective", [False, True])
@pytest.mark.parametrize("host", PEFT_HOSTS)
def test_delta_weight_matches_peft_get_delta_weight(host, effective):
    """peft keeps the LyCORIS names and orientations (Tucker `use_effective_conv2d`: a (r, out),
    b (r, in), Conv1d cores (r, r, k, 1)) and scales by α/r, so its tensors load as they are."""
    peft = pytest.importorskip("peft")
    model, _ = make_host(host, torch.float64)
    config = peft.LoHaConfig(r=4, alpha=3, target_modules=["0"], use_effective_conv2d=effective, init_weights=False)
    model = peft.inject_adapter_in_model(config, model)
    layer = model[0]
    randomize(layer, std=0.5, seed=16)
    tensors = {name: params["default"].detach() for name in layer.adapter_layer_names
               if "default" in (params := getattr(layer, name))}
    assert ("hada_t1" in tensors) == (effective and layer.base_layer.weight[0, 0].numel() > 1)
    host_layer = HostLayer.of(layer.base_layer)
    module = LoHa.from_file_tensors(host_layer, {**tensors, "alpha": torch.tensor(3.0)}, "peft")
    assert module.tucker == ("hada_t1" in tensors)
    expected = layer.get_delta_weight("default")
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(module.delta_weight(), expected, rtol=1e-12, atol=1e-12)
