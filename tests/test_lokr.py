"""LoKr: ΔW and forward against naive formulas written here (torch.kron, explicit index arithmetic),
parity with lycoris-lora 4.1.3 both ways and with peft 0.21.2, file validation."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lycoris_like.modules.lokr as lokr_module  # registers "lokr"/"kron"
from lycoris_like import (
    ConfigError,
    IncompatibleFileError,
    ShapeMismatchError,
    create_network,
    load_network,
    network_from_tensors,
)
from lycoris_like.kernels.kronecker import factorization, kron_conv_bypass, kron_delta, kron_linear_bypass
from lycoris_like.modules import get_algorithm

from conftest import HOSTS, fast, make_host, randomize, reference_op, saved_numels

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
logging.getLogger("lycoris").setLevel(logging.ERROR)

# Each variant exercises a different file layout on the 48→80 Linear and 12→20 conv hosts
# (printed in test_variants_exercise_every_layout).
VARIANTS = {
    "default": dict(dim=4),  # Linear: w1 + low-rank w2; convs: both full (scale 1)
    "factor2": dict(dim=4, factor=2),  # low-rank w2 everywhere
    "decompose_both": dict(dim=1, decompose_both=True),  # w1_a/w1_b and w2_a/w2_b
    "full_matrix": dict(dim=4, factor=2, full_matrix=True),  # both full
    "unbalanced": dict(dim=2, factor=2, unbalanced_factorization=True),  # w1 takes the large out factor
    "tucker": dict(dim=4, factor=2, use_tucker=True),  # lokr_t2 on k>1 convs
    "scalar": dict(dim=4, factor=2, use_scalar=True),
    "rslora": dict(dim=4, factor=2, rs_lora=True),
}
ALPHA = 3.0
PADDING_MODE_HOSTS = {"conv2d-reflect", "conv2d-circular"}  # lycoris ignores padding_mode
LYCORIS_HOSTS = sorted(set(HOSTS) - PADDING_MODE_HOSTS)
# Every variant on one host of each kind (stride, groups, 3-D included); the default on every host.
CORE_HOSTS = ("linear", "conv1d-k3", "conv2d-k1", "conv2d-stride2", "conv2d-groups2", "conv3d-k3")
# lycoris-lora's own loader re-derives the layout from a guessed factor and Tucker-less shapes.
LYCORIS_UNREADABLE = {"tucker", "unbalanced"}


def lycoris_cases(variants) -> list[tuple[str, str]]:
    cases = [(h, "default") for h in LYCORIS_HOSTS]
    return cases + [(h, v) for h in CORE_HOSTS for v in sorted(variants) if v != "default"]


FROM_LYCORIS = lycoris_cases(set(VARIANTS) - {"rslora"})  # lycoris.create_lycoris does not pass rs_lora on
TO_LYCORIS = lycoris_cases(set(VARIANTS) - LYCORIS_UNREADABLE)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------- independent references


def naive_w1(adapter) -> torch.Tensor:
    """W1 (a, c): lokr_w1, or an explicit sum of rank-1 outer products; the scalar folded in."""
    if adapter.lokr_w1 is not None:
        w1 = adapter.lokr_w1.detach().clone()
    else:
        w1_a, w1_b = adapter.lokr_w1_a.detach(), adapter.lokr_w1_b.detach()
        w1 = sum(torch.outer(w1_a[:, j], w1_b[j]) for j in range(w1_b.shape[0]))
    if adapter.scalar is not None:
        w1 = w1 * adapter.scalar.detach()
    return w1


def naive_w2(adapter, kernel: tuple[int, ...]) -> torch.Tensor:
    """W2 (b, d, k…) by explicit sums over the rank (and the Tucker core, LyCORIS orientation:
    W2[p, q] = Σᵢⱼ t2[i, j]·w2_a[i, p]·w2_b[j, q])."""
    ones = [1] * len(kernel)
    if adapter.lokr_w2 is not None:
        return adapter.lokr_w2.detach().clone()
    w2_a, w2_b = adapter.lokr_w2_a.detach(), adapter.lokr_w2_b.detach()
    if adapter.lokr_t2 is not None:
        t2 = adapter.lokr_t2.detach()
        r = t2.shape[0]
        w2 = torch.zeros(w2_a.shape[1], w2_b.shape[1], *kernel, dtype=t2.dtype)
        for i in range(r):
            for j in range(r):
                w2 += w2_a[i].reshape(-1, 1, *ones) * w2_b[j].reshape(1, -1, *ones) * t2[i, j].reshape(1, 1, *kernel)
        return w2
    flat = sum(torch.outer(w2_a[:, j], w2_b[j]) for j in range(w2_b.shape[0]))
    return flat.reshape(w2_a.shape[0], -1, *kernel)


def expected_scale(adapter, alpha: float, rs_lora: bool) -> float:
    """FORMATS.md §3: α / rank of the decomposed half (w2 first); 1 when both halves are full."""
    if adapter.lokr_w2_b is not None:
        rank = adapter.lokr_w2_b.shape[0]
    elif adapter.lokr_w1_b is not None:
        rank = adapter.lokr_w1_b.shape[0]
    else:
        return 1.0
    return alpha / math.sqrt(rank) if rs_lora else alpha / rank


def naive_delta(adapter, weight_shape, alpha: float = ALPHA, rs_lora: bool = False) -> torch.Tensor:
    """scale · torch.kron(W1 unsqueezed at the end, W2)."""
    kernel = tuple(weight_shape[2:])
    w1 = naive_w1(adapter)
    w2 = naive_w2(adapter, kernel)
    return expected_scale(adapter, alpha, rs_lora) * torch.kron(w1.reshape(*w1.shape, *[1] * len(kernel)), w2)


def make_ours(host: str, variant: str, dtype=torch.float64, seed: int = 3, **extra):
    model, x = make_host(host, dtype)
    options = dict(VARIANTS[variant])
    net = create_network(model, algo="lokr", alpha=ALPHA, **options, **extra)
    randomize(net, seed=seed)
    return model, x, net, net.adapters["0"]


# --------------------------------------------------------------------- factorisation and layout


def test_factorization_values_from_the_format_spec():
    assert factorization(320, -1) == (16, 20)
    assert factorization(320, 8) == (8, 40)
    assert factorization(320, 64) == (5, 64)
    assert factorization(640, -1) == (20, 32)
    assert factorization(640, 8) == (8, 80)
    assert factorization(1280, -1) == (32, 40)
    assert factorization(127, -1) == (1, 127)


def test_factorization_agrees_with_lycoris_everywhere():
    from lycoris.functional.general import factorization as theirs

    for d in range(1, 400):
        for f in (-1, 1, 2, 3, 4, 8, 16, 64, 1000):
            m, n = factorization(d, f)
            assert (m, n) == theirs(d, f) and m <= n and m * n == d


def test_peft_factorization_does_not_order_its_pair():
    """Upstream difference: peft 0.21.2 returns (f, d/f) unsorted when f divides d."""
    from peft.tuners.lokr.layer import factorization as peft_factorization

    assert peft_factorization(320, 64) == (64, 5)
    assert factorization(320, 64) == (5, 64)


@pytest.mark.parametrize(
    "options, shapes",
    [
        (dict(), {"lokr_w1": (20, 16), "lokr_w2_a": (32, 4), "lokr_w2_b": (4, 20)}),
        (dict(factor=8), {"lokr_w1": (8, 8), "lokr_w2_a": (80, 4), "lokr_w2_b": (4, 40)}),
        (dict(factor=8, full_matrix=True), {"lokr_w1": (8, 8), "lokr_w2": (80, 40)}),
        (dict(decompose_both=True, dim=2), {"lokr_w1_a": (20, 2), "lokr_w1_b": (2, 16), "lokr_w2_a": (32, 2), "lokr_w2_b": (2, 20)}),
        (dict(unbalanced_factorization=True), {"lokr_w1": (32, 16), "lokr_w2_a": (20, 4), "lokr_w2_b": (4, 20)}),
        (dict(dim=16), {"lokr_w1": (20, 16), "lokr_w2": (32, 20)}),  # r ≥ max(b, d)/2 → full w2
        (dict(dim=15), {"lokr_w1": (20, 16), "lokr_w2_a": (32, 15), "lokr_w2_b": (15, 20)}),
    ],
)
def test_layout_on_sd_sized_linear(options, shapes):
    model = nn.Sequential(nn.Linear(320, 640))
    options = {"dim": 4, **options}
    net = create_network(model, algo="lokr", alpha=1, **options)
    got = {k: tuple(v.shape) for k, v in net.adapters["0"].file_tensors().items() if k != "alpha"}
    assert got == shapes


def test_conv_layout_and_tucker_shapes():
    model = nn.Sequential(nn.Conv2d(320, 640, 3, padding=1))
    a = create_network(model, algo="lokr", dim=4, factor=8).adapters["0"]
    assert {k: tuple(v.shape) for k, v in a.file_tensors().items() if k != "alpha"} == {
        "lokr_w1": (8, 8), "lokr_w2_a": (80, 4), "lokr_w2_b": (4, 40 * 9)}
    model = nn.Sequential(nn.Conv2d(320, 640, 3, padding=1))
    a = create_network(model, algo="lokr", dim=4, factor=8, use_tucker=True).adapters["0"]
    assert {k: tuple(v.shape) for k, v in a.file_tensors().items() if k != "alpha"} == {
        "lokr_w1": (8, 8), "lokr_t2": (4, 4, 3, 3), "lokr_w2_a": (4, 80), "lokr_w2_b": (4, 40)}


@pytest.mark.parametrize("mode", ["rebuild", "bypass"])
def test_factor8_on_wider_layers_matches_naive_formulas(mode):
    """On the small matrix hosts factor 8 changes nothing; here it does (160 → 8·20, not 10·16)."""
    torch.manual_seed(0)
    for layer, x in ((nn.Linear(160, 96), torch.randn(3, 160)), (nn.Conv2d(160, 96, 3, padding=1), torch.randn(1, 160, 5, 4))):
        model = nn.Sequential(layer).double()
        x = x.double()
        net = create_network(model, algo="lokr", dim=4, alpha=ALPHA, factor=8, multiplier=0.6, forward_mode=mode)
        randomize(net, seed=8)
        adapter = net.adapters["0"]
        assert tuple(adapter.lokr_w1.shape) == (8, 8)
        assert tuple(adapter.lokr_w2_a.shape) == (12, 4) and adapter.lokr_w2_b.shape[1] == 20 * layer.weight[0, 0].numel()
        delta = naive_delta(adapter, layer.weight.shape)
        torch.testing.assert_close(adapter.delta_weight(), delta, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model(x), reference_op(layer, x, layer.weight + 0.6 * delta), rtol=1e-10, atol=1e-10)


def test_variants_exercise_every_layout():
    def keys(host, variant):
        model, _ = make_host(host)
        a = create_network(model, algo="lokr", alpha=ALPHA, **VARIANTS[variant]).adapters["0"]
        return {k for k in a.file_tensors() if k != "alpha"}

    assert keys("linear", "default") == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    assert keys("conv2d-k3", "default") == {"lokr_w1", "lokr_w2"}
    assert keys("conv2d-k3", "decompose_both") == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    assert keys("linear", "full_matrix") == {"lokr_w1", "lokr_w2"}
    assert keys("conv2d-k3", "tucker") == {"lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}
    assert keys("conv2d-k1", "tucker") == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}  # no core on 1×1
    model, _ = make_host("linear")
    a = create_network(model, algo="lokr", **VARIANTS["unbalanced"]).adapters["0"]
    assert tuple(a.lokr_w1.shape) == (40, 2)  # 80 = 2·40 swapped: W1 holds the larger factor


def test_options_are_validated_and_discoverable():
    cls = get_algorithm("kron")
    assert cls is get_algorithm("lokr")
    assert {"factor", "decompose_both", "full_matrix", "unbalanced_factorization", "use_tucker", "rs_lora",
            "use_scalar", "weight_decompose", "rank_dropout"} <= cls.option_names()
    model, _ = make_host("linear")
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError):
            create_network(model, algo="lokr", factor=bad)
    with pytest.raises(ConfigError, match="factr"):
        create_network(model, algo="lokr", factr=4)


# --------------------------------------------------------------------- ΔW and forward vs naive maths


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_delta_and_forward_match_naive_formulas(host_name, variant):
    model, x = make_host(host_name, torch.float64)
    net = create_network(model, algo="lokr", alpha=ALPHA, multiplier=0.7, **VARIANTS[variant])
    layer = model[0]
    base = reference_op(layer, x, layer.weight)
    randomize(net, seed=3)
    adapter = net.adapters["0"]
    expected_delta = naive_delta(adapter, layer.weight.shape, rs_lora=variant == "rslora")
    assert adapter.delta_weight().shape == layer.weight.shape
    torch.testing.assert_close(adapter.delta_weight(), expected_delta, rtol=1e-12, atol=1e-12)
    expected = reference_op(layer, x, layer.weight + 0.7 * expected_delta)
    assert not torch.allclose(expected, base)
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        assert fast(adapter, x) == (mode == "bypass" and getattr(layer, "groups", 1) == 1)
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_identity_at_init_is_exact(host_name):
    for variant in ("default", "factor2", "scalar"):
        model, x = make_host(host_name)
        base = model(x)
        net = create_network(model, algo="lokr", alpha=ALPHA, **VARIANTS[variant])
        assert torch.equal(net.adapters["0"].delta_weight(), torch.zeros_like(model[0].weight))
        for mode in ("rebuild", "bypass"):
            net.set_forward_mode(mode)
            assert torch.equal(model(x), base)


@pytest.mark.parametrize("host", ["conv1d-k3", "conv2d-k3", "conv2d-k3x1", "conv3d-k3", "conv2d-groups2"])
def test_conv_delta_is_w1_unsqueezed_at_the_end_by_index_arithmetic(host):
    """ΔW[i·b + p, j·d + q, …] = γ·W1[i, j]·W2[p, q, …] for every output/input channel pair."""
    _, _, _, adapter = make_ours(host, "default")
    w1, w2 = adapter.lokr_w1.detach(), adapter.lokr_w2.detach()
    (a, c), (b, d) = w1.shape, w2.shape[:2]
    delta = adapter.delta_weight()
    assert delta.shape[:2] == (a * b, c * d)
    for o in range(a * b):
        for i in range(c * d):
            torch.testing.assert_close(delta[o, i], w1[o // b, i // d] * w2[o % b, i % d], rtol=0, atol=0)


@pytest.mark.parametrize("host", ["linear", "conv1d-k1", "conv2d-k3", "conv3d-k3"])
def test_bypass_never_builds_the_kronecker_product(host, monkeypatch):
    model, x, net, adapter = make_ours(host, "factor2", multiplier=0.5)
    net.set_forward_mode("rebuild")
    expected = model(x)

    def forbidden(*args, **kwargs):
        raise AssertionError("the bypass built ΔW")

    monkeypatch.setattr(lokr_module, "kron_delta", forbidden)
    net.set_forward_mode("bypass")
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_unbatched_conv_input_in_bypass():
    model, x, net, _ = make_ours("conv1d-k3", "factor2")
    net.set_forward_mode("rebuild")
    expected = model(x[0])
    net.set_forward_mode("bypass")
    torch.testing.assert_close(model(x[0]), expected, rtol=1e-10, atol=1e-10)


def test_kernels_against_torch_kron():
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    for kernel in ((), (3,), (3, 1), (2, 3, 3)):
        w2 = torch.randn(5, 6, *kernel, generator=g, dtype=torch.float64)
        ref = torch.kron(w1.reshape(4, 3, *[1] * len(kernel)), w2)
        torch.testing.assert_close(kron_delta(w1, w2), ref, rtol=0, atol=0)
    w2 = torch.randn(5, 6, generator=g, dtype=torch.float64)
    x = torch.randn(2, 7, 18, generator=g, dtype=torch.float64)
    y = kron_linear_bypass(x, w1, lambda h: h @ w2.T)
    torch.testing.assert_close(y, x @ torch.kron(w1, w2).T, rtol=1e-12, atol=1e-12)
    w2 = torch.randn(5, 6, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 18, 7, 6, generator=g, dtype=torch.float64)
    y = kron_conv_bypass(x, w1, lambda h: F.conv2d(h, w2, stride=2, padding=1), 2)
    ref = F.conv2d(x, torch.kron(w1.reshape(4, 3, 1, 1), w2), stride=2, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    # low-rank W2 = w2_a·w2_b split around W1's mixing: down (w2_b) first, up (w2_a) last
    w2_a, w2_b = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64)
    w2 = torch.einsum("br,rdhw->bdhw", w2_a, w2_b)
    up = w2_a.reshape(5, 2, 1, 1)
    y = kron_conv_bypass(x, w1, lambda h: F.conv2d(h, w2_b, stride=2, padding=1), 2, lambda h: F.conv2d(h, up))
    ref = F.conv2d(x, torch.kron(w1.reshape(4, 3, 1, 1), w2), stride=2, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    y = kron_conv_bypass(x[0], w1, lambda h: F.conv2d(h, w2_b, stride=2, padding=1), 2, lambda h: F.conv2d(h, up))
    torch.testing.assert_close(y, ref[0], rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 7, 18, generator=g, dtype=torch.float64)
    w2_b = w2_b[..., 0, 0]
    y = kron_linear_bypass(x, w1, lambda h: h @ w2_b.T, lambda h: h @ w2_a.T)
    torch.testing.assert_close(y, x @ torch.kron(w1, w2_a @ w2_b).T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("host", ["linear", "conv2d-k3", "conv2d-k1", "conv1d-k3"])
@pytest.mark.parametrize("variant", ["factor2", "tucker"])
def test_low_rank_bypass_keeps_no_output_sized_activation(host, variant):
    """With a low-rank W2, W1 mixes the rank-r intermediates before w2_a: what autograd saves for
    backward is rank-sized (and the input), never as large as the layer's output."""
    model, x, net, adapter = make_ours(host, variant)
    assert adapter.lokr_w2 is None
    net.set_forward_mode("bypass")
    model.requires_grad_(False)
    out_numel, saved = saved_numels(model, x)
    assert saved and max(saved) < out_numel, (max(saved), out_numel)


def test_rank_dropout_drops_whole_output_rows_in_both_paths():
    model, x, net, adapter = make_ours("conv2d-k3", "factor2", rank_dropout=0.5)
    full = adapter.delta_weight()
    net.train()
    model.train()
    torch.manual_seed(0)
    dropped = adapter.delta_weight(True)
    kept = [bool(torch.equal(dropped[o], full[o])) for o in range(full.shape[0])]
    zero = [bool(torch.equal(dropped[o], torch.zeros_like(full[o]))) for o in range(full.shape[0])]
    assert all(k or z for k, z in zip(kept, zero)) and any(kept) and any(zero)
    torch.testing.assert_close(adapter.delta_weight(), full, rtol=0, atol=0)  # never in delta_weight
    layer = model[0]
    base = layer._conv_forward(x, layer.weight, layer.bias)
    whole = layer._conv_forward(x, layer.weight + full, layer.bias)
    net.set_forward_mode("bypass")
    y = model(x)
    rows = [torch.allclose(y[:, o], base[:, o], rtol=0, atol=1e-12) for o in range(full.shape[0])]
    full_rows = [torch.allclose(y[:, o], whole[:, o], rtol=1e-10, atol=1e-10) for o in range(full.shape[0])]
    assert all(a or b for a, b in zip(rows, full_rows)) and any(rows) and any(full_rows)


# --------------------------------------------------------------------- merge and files


@pytest.mark.parametrize("variant", ["default", "decompose_both", "tucker", "scalar"])
@pytest.mark.parametrize("host", ["linear", "conv2d-k3"])
def test_merge_equals_our_forward_exactly(host, variant):
    model, x, net, adapter = make_ours(host, variant, dtype=torch.float32)
    net.set_forward_mode("rebuild")
    unmerged = model(x)
    w = model[0].weight.detach().clone()
    net.merge()
    assert torch.equal(model(x), unmerged)
    torch.testing.assert_close(model[0].weight, w + naive_delta(adapter, w.shape).float(), rtol=1e-6, atol=1e-6)
    net.unmerge()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("host", ["linear", "conv2d-k3"])
def test_save_load_round_trip_is_bit_exact(tmp_path, host, variant):
    model, x, net, adapter = make_ours(host, variant, dtype=torch.float32)
    expected = model(x)
    net.save(tmp_path / "a.safetensors")
    fresh, _ = make_host(host)
    loaded = load_network(fresh, tmp_path / "a.safetensors")
    other = loaded.adapters["0"]
    assert torch.equal(other.delta_weight(), adapter.delta_weight())
    assert torch.equal(fresh(x), expected)
    assert other.file_tensors().keys() == adapter.file_tensors().keys()
    assert other.config()["w1_shape"] == adapter.config()["w1_shape"]
    assert other.config()["use_tucker"] == adapter.config()["use_tucker"]


def test_both_full_files_store_alpha_dim_and_use_scale_one():
    model, _ = make_host("conv2d-k3")
    net = create_network(model, algo="lokr", dim=4, alpha=2)
    adapter = net.adapters["0"]
    assert adapter.lokr_w1 is not None and adapter.lokr_w2 is not None
    assert adapter.scale == 1.0 and float(adapter.file_tensors()["alpha"]) == 4.0


def file_of(host: str, variant: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model, _, net, _ = make_ours(host, variant, dtype=torch.float32)
    fresh, _ = make_host(host)
    return fresh, dict(net.file_state_dict())


@pytest.mark.parametrize(
    "host, variant, change, error, key",
    [
        ("linear", "default", lambda t: t.update({"lycoris_0.lokr_w2_b": torch.zeros(4, 7)}), ShapeMismatchError, "lokr_w1"),
        ("linear", "default", lambda t: t.update({"lycoris_0.lokr_w2_a": torch.zeros(10, 3)}), ShapeMismatchError, "lokr_w2_b"),
        ("linear", "default", lambda t: t.update({"lycoris_0.lokr_w1": torch.zeros(8)}), ShapeMismatchError, "lokr_w1"),
        ("linear", "default", lambda t: t.update({"lycoris_0.lokr_w1_a": torch.zeros(8, 4)}), IncompatibleFileError, "lokr_w1_a"),
        ("linear", "default", lambda t: t.update({"lycoris_0.lokr_w2": torch.zeros(10, 8)}), IncompatibleFileError, "lokr_w2"),
        ("linear", "default", lambda t: [t.pop(k) for k in list(t) if "w2" in k], IncompatibleFileError, "lokr_w2"),
        ("linear", "default", lambda t: t.pop("lycoris_0.lokr_w2_b"), IncompatibleFileError, "lokr_w2_b"),
        ("linear", "default", lambda t: t.update({"lycoris_0.alpha": torch.tensor([1.0, 2.0])}), IncompatibleFileError, "alpha"),
        ("conv2d-k3", "default", lambda t: t.update({"lycoris_0.lokr_w2": torch.zeros(5, 4, 3, 1)}), ShapeMismatchError, "lokr_w2"),
        ("conv2d-k3", "tucker", lambda t: t.update({"lycoris_0.lokr_t2": torch.zeros(4, 4, 1, 3)}), ShapeMismatchError, "lokr_t2"),
        ("conv2d-k3", "factor2", lambda t: t.update({"lycoris_0.lokr_w2_b": torch.zeros(4, 55)}), ShapeMismatchError, "lokr_w2_b"),
        ("conv2d-k3", "default", lambda t: t.update({"lycoris_0.lokr_t2": torch.zeros(4, 4, 3, 3)}), IncompatibleFileError, "lokr_t2"),
    ],
)
def test_bad_files_raise_typed_errors_naming_the_key(host, variant, change, error, key):
    model, tensors = file_of(host, variant)
    change(tensors)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error) as info:
        network_from_tensors(model, tensors)
    assert f"lycoris_0.{key}" in info.value.keys
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert "forward" not in model[0].__dict__


def test_layout_comes_from_the_file_not_from_factor():
    """A factor-8 file and an unbalanced file load into a plain network without any option."""
    for variant in ("factor2", "unbalanced", "decompose_both"):
        model, tensors = file_of("linear", variant)
        loaded = network_from_tensors(model, tensors).adapters["0"]
        assert {k: tuple(v.shape) for k, v in loaded.file_tensors().items()} == {
            k.split(".", 1)[1]: tuple(v.shape) for k, v in tensors.items()}


@pytest.mark.parametrize("host", ["linear", "conv2d-k1"])
def test_a_tucker_core_on_a_pointwise_layer_is_folded(host):
    model, x = make_host(host, torch.float64)
    r, (out, inp) = 3, model[0].weight.shape[:2]
    (a, b), (c, d) = factorization(out), factorization(inp)
    g = torch.Generator().manual_seed(7)
    ones = [1] * (model[0].weight.dim() - 2)
    t = {
        "lycoris_0.lokr_w1": torch.randn(a, c, generator=g, dtype=torch.float64),
        "lycoris_0.lokr_t2": torch.randn(r, r, *ones, generator=g, dtype=torch.float64),
        "lycoris_0.lokr_w2_a": torch.randn(r, b, generator=g, dtype=torch.float64),
        "lycoris_0.lokr_w2_b": torch.randn(r, d, generator=g, dtype=torch.float64),
        "lycoris_0.alpha": torch.tensor(2.0),
    }
    adapter = network_from_tensors(model, t).adapters["0"]
    w2 = torch.einsum("ij,ip,jq->pq", t["lycoris_0.lokr_t2"].reshape(r, r), t["lycoris_0.lokr_w2_a"], t["lycoris_0.lokr_w2_b"])
    expected = (2.0 / r) * torch.kron(t["lycoris_0.lokr_w1"], w2).reshape(model[0].weight.shape)
    torch.testing.assert_close(adapter.delta_weight(), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------- lycoris-lora 4.1.3


def lycoris_network(model: nn.Module, variant: str, **extra):
    from lycoris import create_lycoris

    options = dict(VARIANTS[variant])
    dim = options.pop("dim")
    net = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=2, algo="lokr", preset="full", **options, **extra)
    net.apply_to()
    return net


@pytest.mark.parametrize("host, variant", FROM_LYCORIS)
def test_lycoris_file_loads_into_ours_with_their_module_forward(tmp_path, host, variant):
    model, x = make_host(host)
    ours = copy.deepcopy(model)
    theirs = lycoris_network(model, variant)
    randomize(theirs, seed=2)
    with torch.no_grad():
        expected = model(x)  # their module forward
    theirs.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    net = load_network(ours, tmp_path / "l.safetensors")
    (module,) = theirs.loras
    assert net.adapters["0"].scale == pytest.approx(module.scale)
    with torch.no_grad():
        assert rel_err(ours(x), expected) <= 1e-5
        net.set_forward_mode("bypass")
        assert rel_err(ours(x), expected) <= 1e-5


@pytest.mark.parametrize("variant", sorted(LYCORIS_UNREADABLE))
def test_lycoris_cannot_reload_its_own_tucker_and_unbalanced_files(tmp_path, variant):
    from lycoris import create_lycoris_from_weights

    model, x = make_host("conv2d-k3")
    fresh, ours = copy.deepcopy(model), copy.deepcopy(model)
    theirs = lycoris_network(model, variant)
    randomize(theirs, seed=2)
    with torch.no_grad():
        expected = model(x)
    theirs.save_weights(str(tmp_path / "l.safetensors"), torch.float32, {})
    with pytest.raises((AttributeError, RuntimeError)):
        again, weights = create_lycoris_from_weights(1.0, str(tmp_path / "l.safetensors"), fresh)
        again.apply_to()
        again.load_state_dict(weights, False)
    load_network(ours, tmp_path / "l.safetensors")
    with torch.no_grad():
        assert rel_err(ours(x), expected) <= 1e-5


@pytest.mark.parametrize("host, variant", TO_LYCORIS)
def test_our_file_loads_in_lycoris_with_the_same_output(tmp_path, host, variant):
    from lycoris import create_lycoris_from_weights

    model, x = make_host(host)
    theirs_model = copy.deepcopy(model)
    net = create_network(model, algo="lokr", alpha=2, **VARIANTS[variant])
    randomize(net, seed=4)
    with torch.no_grad():
        expected = model(x)
    net.save(tmp_path / "ours.safetensors")
    theirs, weights = create_lycoris_from_weights(1.0, str(tmp_path / "ours.safetensors"), theirs_model)
    theirs.apply_to()
    result = theirs.load_state_dict(weights, False)
    assert not result.unexpected_keys and len(theirs.loras) == 1
    with torch.no_grad():
        assert rel_err(theirs_model(x), expected) <= 1e-5


def test_lycoris_dora_file_loads_into_ours(tmp_path):
    for host in ("linear", "conv2d-k3"):
        model, x = make_host(host)
        ours = copy.deepcopy(model)
        theirs = lycoris_network(model, "factor2", dora_wd=True)
        randomize(theirs, seed=2)
        with torch.no_grad():
            expected = model(x)
        theirs.save_weights(str(tmp_path / "d.safetensors"), torch.float32, {})
        net = load_network(ours, tmp_path / "d.safetensors")
        assert net.adapters["0"].dora_scale is not None
        with torch.no_grad():
            assert rel_err(ours(x), expected) <= 1e-5


@pytest.mark.parametrize("host", ["linear", "conv2d-k3"])
def test_lycoris_merge_applies_gamma_twice_and_ours_does_not(host):
    """Regression: lycoris-lora 4.1.3 `merge_to` scales LoKr's ΔW by γ² (get_weight already
    includes γ, get_diff_weight multiplies again); its forward uses γ once."""
    model, x = make_host(host, torch.float64)
    ours_model = copy.deepcopy(model)
    theirs = lycoris_network(model, "factor2")
    randomize(theirs, seed=3)
    (module,) = theirs.loras
    gamma = module.scale
    assert gamma == 0.5
    with torch.no_grad():
        w0 = model[0].weight.detach().clone()
        w1 = module.lokr_w1.double()  # lycoris keeps float32 parameters on a float64 host
        w2 = module.lokr_w2_a.double() @ module.lokr_w2_b.double()
        kron = torch.kron(w1.reshape(*w1.shape, *[1] * (w0.dim() - 2)),
                          w2.reshape(w2.shape[0], -1, *w0.shape[2:]))
        forward = model(x)
        assert rel_err(forward, reference_op(model[0], x, w0 + gamma * kron)) <= 1e-6
        theirs.merge_to(1.0)
        merged = model[0].weight.detach().clone()
    assert rel_err(merged, w0 + gamma**2 * kron) <= 1e-6
    assert rel_err(merged, w0 + gamma * kron) > 1e-3

    # ours, on the same factors: merge == forward, bit for bit
    net = create_network(ours_model, algo="lokr", dim=4, alpha=2, factor=2)
    adapter = net.adapters["0"]
    with torch.no_grad():
        for key in ("lokr_w1", "lokr_w2_a", "lokr_w2_b"):
            getattr(adapter, key).copy_(getattr(module, key))
    net.set_forward_mode("rebuild")
    unmerged = ours_model(x)
    assert rel_err(unmerged, forward) <= 1e-6  # lycoris computes in its float32 parameters
    net.merge()
    assert torch.equal(ours_model(x), unmerged)
    torch.testing.assert_close(ours_model[0].weight, w0 + gamma * kron, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------- peft 0.21.2


def peft_lokr(model: nn.Module, r: int, **config):
    from peft import LoKrConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(model), LoKrConfig(r=r, alpha=2, target_modules=["0"], **config))
    return wrapped.base_model.model[0]


def copy_into_peft(adapter, layer) -> None:
    with torch.no_grad():
        for key in lokr_module.PARAM_NAMES:
            value = getattr(adapter, key)
            if value is not None:
                target = getattr(layer, key)["default"]
                target.copy_(value.reshape(target.shape))


@pytest.mark.parametrize(
    "host, options, peft_options",
    [
        ("linear", dict(dim=4), {}),
        ("linear", dict(dim=1, decompose_both=True), dict(decompose_both=True)),
        ("linear", dict(dim=4, factor=2), dict(decompose_factor=2)),
        ("conv2d-k3", dict(dim=4, factor=2), dict(decompose_factor=2)),
        ("conv2d-k3", dict(dim=4, factor=2, use_tucker=True), dict(decompose_factor=2, use_effective_conv2d=True)),
        ("conv2d-k1", dict(dim=4, factor=2), dict(decompose_factor=2)),
        ("conv1d-k3", dict(dim=4, factor=2), dict(decompose_factor=2)),  # low-rank w2: peft is right
    ],
)
def test_peft_delta_weight_matches_ours(host, options, peft_options):
    model, _ = make_host(host, torch.float64)
    layer = peft_lokr(model, options["dim"], **peft_options)
    net = create_network(model, algo="lokr", alpha=2, **options)
    randomize(net, seed=5)
    adapter = net.adapters["0"]
    peft_keys = {k for k in lokr_module.PARAM_NAMES if "default" in getattr(layer, k)}
    assert peft_keys == {k for k in lokr_module.PARAM_NAMES if getattr(adapter, k) is not None}
    copy_into_peft(adapter, layer)
    assert layer.scaling["default"] == adapter.scale
    torch.testing.assert_close(layer.get_delta_weight("default"), adapter.delta_weight(), rtol=1e-12, atol=1e-12)


def test_peft_conv1d_full_w2_scrambles_the_layout():
    """peft 0.21.2 unsqueezes W1 only for 4-D W2, so a Conv1d with a full W2 gets
    torch.kron(W1 as (1, a, c), W2) — channels and kernel taps mixed up. Ours follows the
    naive reference (W1 unsqueezed at the end)."""
    model, _ = make_host("conv1d-k3", torch.float64)
    layer = peft_lokr(model, 4)
    net = create_network(model, algo="lokr", dim=4, alpha=2)
    randomize(net, seed=6)
    adapter = net.adapters["0"]
    assert adapter.lokr_w2 is not None and tuple(adapter.lokr_w2.shape) == (5, 4, 3)
    copy_into_peft(adapter, layer)
    w1, w2 = adapter.lokr_w1.detach(), adapter.lokr_w2.detach()
    reference = torch.kron(w1[:, :, None], w2)  # scale 1: both halves full
    torch.testing.assert_close(adapter.delta_weight(), reference, rtol=1e-12, atol=1e-12)
    assert layer.scaling["default"] == 0.5 and adapter.scale == 1.0  # peft uses α/r even with both halves full
    theirs = layer.get_delta_weight("default") / layer.scaling["default"]
    scrambled = torch.kron(w1[None], w2).reshape(reference.shape)
    torch.testing.assert_close(theirs, scrambled, rtol=1e-12, atol=1e-12)
    assert rel_err(theirs, reference) > 0.1


# ----------------------------------------------------------------------------- the factorisation rule


def _closest_pair(d: int, bound: int | None) -> tuple[int, int]:
    """The paper's eq. 5 by brute force: the divisor pair (m ≤ n) closest to √d with m ≤ bound."""
    pairs = [(m, d // m) for m in range(1, d + 1) if d % m == 0 and m <= d // m and (bound is None or m <= bound)]
    return min(pairs, key=lambda p: p[1] - p[0])


def test_the_two_factorisation_rules_against_brute_force():
    differ = total = 0
    for d in range(1, 257):
        for f in [-1, *range(1, d + 1)]:
            paper = factorization(d, f, "paper")
            assert paper == _closest_pair(d, None if f < 0 else f), (d, f)
            lycoris = factorization(d, f, "lycoris")
            expected = (min(f, d // f), max(f, d // f)) if f > 0 and d % f == 0 else paper
            assert lycoris == expected, (d, f)
            total += 1
            differ += lycoris != paper
    assert 0 < differ < total
    assert factorization(320, 64, "lycoris") == (5, 64) and factorization(320, 64, "paper") == (16, 20)
    assert factorization(16, 8, "lycoris") == (2, 8) and factorization(16, 8, "paper") == (4, 4)
    assert factorization(320, 8, "lycoris") == factorization(320, 8, "paper") == (8, 40)


def test_the_factorization_option_shapes_the_factors_and_is_validated():
    layer = nn.Linear(320, 16)
    lycoris_net = create_network(nn.Sequential(layer), algo="lokr", dim=4, factor=8)
    paper_net = create_network(nn.Sequential(nn.Linear(320, 16)), algo="lokr", dim=4, factor=8, factorization="paper")
    w1 = lambda net: tuple(net.adapters["0"].lokr_w1.shape)  # noqa: E731
    assert w1(lycoris_net) == (2, 8) and w1(paper_net) == (4, 8)  # W1 (a, c): out 16 → a = 2 or 4; in 320 → c = 8 both
    assert paper_net.adapters["0"].config()["factorization"] == "paper"
    with pytest.raises(ConfigError, match="factorization"):
        create_network(nn.Sequential(nn.Linear(8, 8)), algo="lokr", factorization="eq5")
