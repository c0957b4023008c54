"""SVDiff: ΔW against a naive float64 SVD written here, the multiplier inside the ReLU, δ-space
combination, sign-flip invariance, bypass ≡ rebuild (outputs and gradients), the cost model,
exact identity / merge / unmerge, files (ours in a fresh process; a different base refused) and
svdiff-pytorch's `spectral_shifts.safetensors`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lycoris_like.modules.svdiff as svdiff_module  # registers "svdiff"
from lycoris_like import (
    ConfigError,
    IncompatibleFileError,
    MergeError,
    ShapeMismatchError,
    create_network,
    load_network,
)
from lycoris_like.interop import (
    load_svdiff_pytorch,
    network_from_svdiff_pytorch,
    save_svdiff_pytorch,
    svdiff_pytorch_tensors,
)
from lycoris_like.injection import dispatch_of
from lycoris_like.kernels.spectral import combine_shifts, interpolate_shifts
from lycoris_like.modules import get_algorithm

from conftest import HOSTS, bits, fast, has_fast_path, make_host, reference_op

SVDiff = svdiff_module.SVDiff



pytestmark = pytest.mark.usefixtures("one_thread")


# Host layers beyond conftest's Linear/Conv matrix: wide and tall matrices, embedding, norms.
EXTRA_HOSTS = {
    "linear-wide": (lambda: nn.Linear(80, 24), (3, 80)),
    "embedding": (lambda: nn.Embedding(40, 12, padding_idx=0), (2, 7)),
    "layernorm": (lambda: nn.LayerNorm(16), (3, 5, 16)),
    "groupnorm": (lambda: nn.GroupNorm(4, 12), (2, 12, 5, 4)),
}
MATRIX_HOSTS = ["linear", "linear-wide", "conv1d-k1", "conv1d-k3", "conv2d-k1", "conv2d-k3", "conv2d-stride2",
                "conv2d-groups2", "conv2d-reflect", "conv3d-k3", "embedding"]
NORM_HOSTS = ["layernorm", "groupnorm"]


def host(name: str, dtype=torch.float64, seed: int = 0):
    """A host layer in a Sequential (path "0") and an input, with non-trivial norm gains."""
    if name in HOSTS:
        return make_host(name, dtype, seed)
    factory, shape = EXTRA_HOSTS[name]
    torch.manual_seed(seed)
    model = nn.Sequential(factory()).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "embedding":
        x = torch.randint(0, 40, shape, generator=g)
    else:
        x = torch.randn(shape, generator=g).to(dtype)
        with torch.no_grad():  # gains of mixed sign and size, biases non-zero
            model[0].weight.copy_(torch.randn(model[0].weight.shape, generator=g) + 0.5)
            model[0].bias.copy_(torch.randn(model[0].bias.shape, generator=g))
    return model, x


def op(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's maths with another weight, written from its attributes."""
    if isinstance(module, nn.Embedding):
        return weight[x]
    if isinstance(module, nn.LayerNorm):
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + module.eps) * weight + module.bias
    if isinstance(module, nn.GroupNorm):
        n, c = x.shape[:2]
        h = x.reshape(n, module.num_groups, -1)
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + module.eps)
        h = h.reshape(x.shape)
        shape = (1, c) + (1,) * (x.dim() - 2)
        return h * weight.reshape(shape) + module.bias.reshape(shape)
    return reference_op(module, x, weight)


def naive_svd(weight: torch.Tensor):
    """torch.linalg.svd in float64 of the weight as svdiff-pytorch views it: (out, in·k…) in C
    order, a norm gain as one row (1, C) — no transposition, no helper from the library."""
    w = weight.detach().double()
    matrix = w.unsqueeze(0) if w.dim() == 1 else w.reshape(w.shape[0], -1)
    return torch.linalg.svd(matrix, full_matrices=False)


def naive_delta(weight: torch.Tensor, delta: torch.Tensor, s: float = 1.0) -> torch.Tensor:
    """U·diag(ReLU(σ + s·δ) − σ)·Vh, reshaped to the weight."""
    u, sigma, vh = naive_svd(weight)
    gain = torch.clamp(sigma + s * delta.detach().double(), min=0) - sigma
    return (u @ torch.diag(gain) @ vh).reshape(weight.shape)


def clipping_shifts(weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """δ of the size of σ with several σᵢ + δᵢ < 0 (so the ReLU clips at s = 1)."""
    sigma = naive_svd(weight)[1]
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(sigma.shape, generator=g, dtype=torch.float64) * sigma * 1.2
    delta[-1] = -2.0 * sigma[-1]  # the smallest always clips
    return delta


def make(name: str, dtype=torch.float64, seed: int = 0, shifts_seed: int | None = 3, **options):
    model, x = host(name, dtype, seed)
    base = model(x)
    net = create_network(model, algo="svdiff", preset=None, **options)
    adapter = net.adapters["0"]
    if shifts_seed is not None:
        with torch.no_grad():
            if adapter.direct:
                g = torch.Generator().manual_seed(shifts_seed)
                adapter.gain_delta.copy_(torch.randn(adapter.gain_delta.shape, generator=g) * 0.7)
            else:
                adapter.delta.copy_(clipping_shifts(model[0].weight, shifts_seed))
    return model, x, base, net, adapter


def shifts_of(adapter) -> torch.Tensor:
    return adapter.gain_delta if adapter.direct else adapter.delta


def reference(model, adapter, s: float) -> torch.Tensor:
    """ΔW(s) by the naive formulas: spectral (matrices, scalar norms) or s·δ (direct norms)."""
    weight = model[0].weight
    if adapter.direct:
        return s * adapter.gain_delta.detach().double()
    return naive_delta(weight, adapter.delta, s)


# --------------------------------------------------------------------- ΔW against naive float64 maths


@pytest.mark.parametrize("name, one_d", [(h, "scalar") for h in MATRIX_HOSTS + NORM_HOSTS] + [(h, "direct") for h in NORM_HOSTS])
def test_delta_matches_naive_float64_svd(name, one_d):
    model, x, base, net, adapter = make(name, one_d=one_d, multiplier=0.6)
    weight = model[0].weight
    assert adapter.delta_weight().shape == weight.shape
    torch.testing.assert_close(adapter.delta_weight(), reference(model, adapter, 1.0), rtol=1e-10, atol=1e-12)
    for s in (0.6, -0.8, 2.5):
        got = adapter.delta_at(torch.tensor(s, dtype=torch.float64))
        torch.testing.assert_close(got, reference(model, adapter, s), rtol=1e-10, atol=1e-12)
    expected = op(model[0], x, weight + reference(model, adapter, 0.6))
    assert not torch.allclose(expected, base)
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_scalar_norm_shift_is_svdiff_pytorch_rule():
    """γ' = ReLU(‖γ‖ + s·δ)·γ/‖γ‖: one number per norm layer, the gain's direction unchanged."""
    model, x, base, net, adapter = make("groupnorm", one_d="scalar", shifts_seed=None)
    gamma = model[0].weight.detach().clone()
    with torch.no_grad():
        adapter.delta.fill_(-0.4 * gamma.norm().item())
    for s in (1.0, 0.5, 3.0):  # s = 3: ‖γ‖ − 1.2‖γ‖ < 0 clips, γ' = 0
        norm = gamma.norm()
        expected = torch.clamp(norm - s * 0.4 * norm, min=0) * gamma / norm - gamma
        torch.testing.assert_close(adapter.delta_at(torch.tensor(s, dtype=torch.float64)), expected,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "conv2d-k3", "embedding"])
@pytest.mark.parametrize("buffers", ["compact", "float32", "float64", "lean"])
def test_every_buffer_layout_on_float32_hosts(name, buffers):
    model, x, base, net, adapter = make(name, torch.float32, svd_buffers=buffers)
    expected = reference(model, adapter, 1.0)
    got = adapter.delta_weight()
    assert got.dtype == torch.float32
    tol = 1e-5 if buffers in ("compact", "float32") else 1e-6
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    kept = {n: b.dtype for n, b in adapter.named_buffers() if n != "multiplier"}
    if buffers in ("lean", "compact"):
        assert set(kept) == {"S", "small"}
        assert set(kept.values()) == {torch.float64 if buffers == "lean" else torch.float32}
        assert has_fast_path(adapter) == (buffers == "compact")
    else:
        assert set(kept) == {"S", "U", "Vh"}
        assert set(kept.values()) == {torch.float32 if buffers == "float32" else torch.float64}


def test_lean_buffers_are_smaller_and_handle_zero_singular_values():
    torch.manual_seed(0)
    layer = nn.Linear(12, 40).double()
    with torch.no_grad():  # rank 3: nine singular values are (numerically) zero
        layer.weight.copy_(torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 12, dtype=torch.float64))
    shifts = torch.linspace(-1, 2, 12, dtype=torch.float64)
    deltas = {}
    for buffers in ("float64", "lean"):
        model = nn.Sequential(layer)
        net = create_network(model, algo="svdiff", preset=None, svd_buffers=buffers)
        adapter = net.adapters["0"]
        with torch.no_grad():
            adapter.delta.copy_(shifts)
        deltas[buffers] = (adapter.delta_weight(), adapter.buffer_bytes())
        if buffers == "lean":
            assert adapter.tail is not None and adapter.tail.shape == (40, 9)
        net.remove()
    assert torch.isfinite(deltas["lean"][0]).all()
    torch.testing.assert_close(deltas["lean"][0], deltas["float64"][0], rtol=1e-10, atol=1e-10)
    # A full-rank wide conv: the lean layout keeps only σ and the 20 × 20 factor.
    model, x, base, net, adapter = make("conv2d-k3", svd_buffers="lean")
    assert adapter.tail is None and adapter.buffer_bytes() == (20 + 20 * 20) * 8
    # float32: σ and both factors; compact (the default): σ and the small factor, in float32.
    conv = host("conv2d-k3", torch.float32)[0]
    assert create_network(conv, algo="svdiff", preset=None, svd_buffers="float32").adapters["0"].buffer_bytes() == (
        20 + 20 * 20 + 20 * 108) * 4
    assert create_network(conv, algo="svdiff", preset=None, stack=True).adapters["0"].buffer_bytes() == (20 + 20 * 20) * 4


@pytest.mark.parametrize("name", ["linear", "linear-wide"])
@pytest.mark.parametrize("buffers", ["lean", "compact"])
def test_recovering_layouts_refuse_a_host_weight_another_network_merged_into(buffers, name):
    model, x, base, net, adapter = make(name, torch.float32, svd_buffers=buffers)
    expected = model(x)
    lora = create_network(model, algo="lora", preset=None, stack=True)
    with torch.no_grad():
        lora.adapters["0"].lora_up.weight.fill_(0.1)
        lora.merge()
    for mode in ("rebuild", "bypass", "auto"):
        net.set_forward_mode(mode)
        with pytest.raises(MergeError, match=buffers):
            model(x)
    with pytest.raises(MergeError, match=buffers):
        net.merge()
    lora.unmerge()
    lora.remove()
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("shape", [(24, 80), (80, 24), (30, 30)])
def test_gram_svd_gives_sigma_and_the_small_factor(shape):
    """compact's float32 buffers come from eigh of the smaller Gram matrix (float64): σ and the small
    factor agree with the naive SVD (vectors up to sign) on a weight with σ spread over 1 … 1e-3."""
    from lycoris_like.kernels.spectral import gram_svd

    rows, cols = shape
    r = min(shape)
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(rows, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, r, generator=g, dtype=torch.float64))[0]
    weight = (u * torch.logspace(0, -3, r, dtype=torch.float64)) @ v.T
    sigma, small = gram_svd(weight)
    nu, ns, nvh = torch.linalg.svd(weight, full_matrices=False)
    torch.testing.assert_close(sigma, ns, rtol=1e-9, atol=0)
    expected = nu if rows <= cols else nvh.T
    got = small if rows <= cols else small.T
    signs = torch.sign((got * expected).sum(0))
    torch.testing.assert_close(got * signs, expected, rtol=0, atol=1e-9)
    # Through the model: a float32 layer keeps σ and the small factor, float32-rounded.
    model = nn.Sequential(nn.Linear(cols, rows))
    with torch.no_grad():
        model[0].weight.copy_(weight)
    adapter = create_network(model, algo="svdiff", preset=None).adapters["0"]
    assert adapter.svd_buffers == "compact" and adapter.tail is None and adapter.small.dtype == torch.float32
    assert adapter.small.shape == (r, r)
    nu, ns, nvh = torch.linalg.svd(model[0].weight.detach().double(), full_matrices=False)
    torch.testing.assert_close(adapter.S.double(), ns, rtol=1e-6, atol=0)
    kept, naive = (adapter.small.double(), nu) if rows <= cols else (adapter.small.double().T, nvh.T)
    torch.testing.assert_close(kept * torch.sign((kept * naive).sum(0)), naive, rtol=0, atol=1e-5)


def test_svd_runs_on_the_tall_orientation(monkeypatch):
    shapes = []
    real_svd = torch.linalg.svd

    def spy(a, *args, **kwargs):
        shapes.append(tuple(a.shape))
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    model = nn.Sequential(nn.Linear(200, 16), nn.Linear(16, 200), nn.Conv2d(8, 16, 3), nn.Embedding(10, 30)).double()
    net = create_network(model, algo="svdiff", preset=None, svd_buffers="float64")
    assert sorted(shapes) == sorted([(200, 16), (200, 16), (72, 16), (30, 10)])
    assert all(rows >= cols for rows, cols in shapes)
    for adapter, layer in zip(net, model):
        matrix = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        r = min(matrix.shape)
        assert adapter.U.shape == (matrix.shape[0], r) and adapter.Vh.shape == (r, matrix.shape[1])
        assert adapter.S.dtype == torch.float64 and bool((adapter.S[:-1] >= adapter.S[1:]).all())
        torch.testing.assert_close(adapter.U @ torch.diag(adapter.S) @ adapter.Vh, matrix, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(adapter.U.T @ adapter.U, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(adapter.Vh @ adapter.Vh.T, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(adapter.S, torch.linalg.svdvals(matrix), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------- multiplier, combination, signs


@pytest.mark.parametrize("name", ["linear", "conv2d-k3", "embedding", "layernorm"])
def test_multiplier_sits_inside_the_relu(name):
    model, x, base, net, adapter = make(name)
    one = adapter.delta_weight()
    half = adapter.delta_at(torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(half, reference(model, adapter, 0.5), rtol=1e-10, atol=1e-12)
    assert (half - 0.5 * one).abs().max() > 1e-3 * one.abs().max()  # not a linear scaling: some σ + sδ clip
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        net.set_multiplier(0.0)
        assert torch.equal(model(x), base)  # s = 0: the base, exactly
        net.set_multiplier(0.5)
        torch.testing.assert_close(model(x), op(model[0], x, model[0].weight + reference(model, adapter, 0.5)),
                                   rtol=1e-10, atol=1e-10)
    net.set_multiplier(0.0)
    assert torch.equal(adapter.delta_at(adapter.multiplier), torch.zeros_like(one))
    with torch.no_grad():
        net.merge()
    assert torch.equal(model(x), base)


def test_delta_space_combination_and_interpolation():
    model, x, base, net, adapter = make("linear", shifts_seed=None)
    weight = model[0].weight
    d1, d2 = clipping_shifts(weight, 1), clipping_shifts(weight, 2)
    combined = combine_shifts([d1, d2])
    assert torch.equal(combined, d1 + d2)
    with torch.no_grad():
        adapter.delta.copy_(combined)
    u, sigma, vh = naive_svd(weight)
    relu_sum = u @ torch.diag(torch.clamp(sigma + d1 + d2, min=0) - sigma) @ vh
    torch.testing.assert_close(adapter.delta_weight(), relu_sum, rtol=1e-10, atol=1e-12)
    summed = naive_delta(weight, d1) + naive_delta(weight, d2)
    assert (relu_sum - summed).abs().max() > 1e-3 * summed.abs().max()  # ΔWs do not add where σ clips
    a = 0.3
    mixed = interpolate_shifts(d1, d2, a)
    torch.testing.assert_close(mixed, a * d1 + (1 - a) * d2, rtol=1e-15, atol=1e-15)
    with torch.no_grad():
        adapter.delta.copy_(mixed)
    torch.testing.assert_close(
        adapter.delta_weight(), u @ torch.diag(torch.clamp(sigma + a * d1 + (1 - a) * d2, min=0) - sigma) @ vh,
        rtol=1e-10, atol=1e-12)
    # float32 sets are summed in float64 and rounded once
    f1, f2, f3 = (torch.tensor([1.0, 2.0**-24, -1.0], dtype=torch.float32),) * 3
    assert combine_shifts([f1, f2, f3], [1.0, 1.0, -1.0]).dtype == torch.float32
    with pytest.raises(ValueError):
        combine_shifts([d1, d1[:-1]])
    # Two networks stacked on one layer add their ΔWs (not their shifts).
    other = create_network(model, algo="svdiff", preset=None, stack=True)
    with torch.no_grad():
        adapter.delta.copy_(d1)
        other.adapters["0"].delta.copy_(d2)
    torch.testing.assert_close(model(x), op(model[0], x, weight + summed), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("buffers", ["compact", "float64"])
@pytest.mark.parametrize("name", ["linear", "linear-wide", "conv2d-k3", "embedding"])
def test_flipping_paired_singular_vector_signs_does_not_change_delta(name, buffers):
    model, x, base, net, adapter = make(name, svd_buffers=buffers)
    before = adapter.delta_weight().clone()
    net.set_forward_mode("bypass")
    out_before = model(x)
    g = torch.Generator().manual_seed(5)
    signs = torch.where(torch.rand(adapter.rank, generator=g) < 0.5, -1.0, 1.0).double()
    assert (signs < 0).any() and (signs > 0).any()
    with torch.no_grad():
        if buffers == "compact":  # the small factor alone (no tail: these weights have full rank)
            assert adapter.tail is None
            adapter.small.mul_(signs[:, None] if adapter.tall else signs)
        else:
            adapter.U.mul_(signs)
            adapter.Vh.mul_(signs[:, None])
    assert torch.equal(bits(adapter.delta_weight()), bits(before))
    assert torch.equal(bits(model(x)), bits(out_before))
    # The naive reference with flipped factors agrees too.
    u, sigma, vh = naive_svd(model[0].weight)
    gain = torch.clamp(sigma + adapter.delta.detach(), min=0) - sigma
    torch.testing.assert_close((u * signs) @ torch.diag(gain) @ (vh * signs[:, None]), before.reshape(u.shape[0], -1),
                               rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------- forward paths


@pytest.mark.parametrize("buffers", ["compact", "float32"])
@pytest.mark.parametrize("name", ["linear", "linear-nobias", "linear-wide", "conv1d-k1", "conv1d-k3", "conv2d-k1",
                                  "conv2d-k3", "conv2d-stride2", "conv2d-dilation2", "conv2d-reflect",
                                  "conv2d-circular", "conv2d-k3x1", "conv3d-k1", "conv3d-k3", "embedding"])
def test_bypass_equals_rebuild_forward_and_gradients(name, buffers):
    model, x, base, net, adapter = make(name, multiplier=0.7, svd_buffers=buffers)
    model.requires_grad_(False)
    results = {}
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        assert fast(adapter, x) == (mode == "bypass")
        net.zero_grad()
        out = model(x)
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().sum().backward()
        results[mode] = (out.detach(), adapter.delta.grad.clone())
    assert results["rebuild"][1].abs().max() > 0
    torch.testing.assert_close(results["bypass"][0], results["rebuild"][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(results["bypass"][1], results["rebuild"][1], rtol=1e-9, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())
    # float32 hosts agree to float tolerance
    model, x, base, net, adapter = make(name, torch.float32, multiplier=0.7, svd_buffers=buffers)
    outs = []
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        outs.append(model(x).detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


COMPACT_SIDES = {"linear": "in", "linear-nobias": "in", "linear-wide": "out", "conv1d-k1": "in", "conv2d-k1": "in",
                 "conv3d-k1": "in", "conv1d-k3": "out", "conv2d-k3": "out", "conv2d-k3x1": "out",
                 "conv2d-stride2": "out", "conv2d-dilation2": "out", "conv2d-reflect": "out", "conv2d-circular": "out",
                 "conv3d-k3": "out", "conv2d-groups2": None, "embedding": "emb"}


@pytest.mark.parametrize("name", sorted(COMPACT_SIDES))
def test_compact_forward_and_every_gradient_against_the_naive_formula(name):
    """compact goes through the host's own output ("out", "emb") or input ("in"); forward, ∇x and ∇δ
    equal op(x, W + U·diag(ReLU(σ + s·δ) − σ)·Vh) from a float64 SVD written here."""
    model, x, base, net, adapter = make(name, multiplier=0.7)
    assert adapter.side == COMPACT_SIDES[name] and has_fast_path(adapter) == (adapter.side is not None)
    model.requires_grad_(False)
    layer, weight = model[0], model[0].weight.detach()
    u, sigma, vh = naive_svd(weight)
    shifts = adapter.delta.detach().clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(x.is_floating_point())
    delta = (u @ torch.diag(torch.clamp(sigma + 0.7 * shifts, min=0) - sigma) @ vh).reshape(weight.shape)
    expected = op(layer, x_ref, weight + delta)
    probe = torch.linspace(-1, 1, expected.shape[-1], dtype=expected.dtype)
    (expected * probe).square().sum().backward()
    for mode in ("bypass", "auto"):
        net.set_forward_mode(mode)
        net.zero_grad()
        x_in = x.clone().requires_grad_(x.is_floating_point())
        out = model(x_in)
        (out * probe).square().sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(adapter.delta.grad, shifts.grad, rtol=1e-9, atol=1e-9)
        if x.is_floating_point():
            torch.testing.assert_close(x_in.grad, x_ref.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
def test_compact_keeps_near_zero_singular_vectors_explicitly(shape):
    """A rank-3 weight: its nine zero singular values cannot be divided by, so their large-factor
    vectors are kept (`tail`); a wide layer still bypasses (output side plus those nine), a tall one
    rebuilds. Both match the float64 layout (the same SVD: a null space's basis is arbitrary, so the
    naive SVD's would give another ΔW), float32 hosts to float32 tolerance."""
    rows, cols = shape
    torch.manual_seed(0)
    weight = torch.randn(rows, 3, dtype=torch.float64) @ torch.randn(3, cols, dtype=torch.float64)
    shifts = torch.linspace(-1, 2, 12, dtype=torch.float64)
    x = torch.randn(5, cols, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        layers = {}
        for buffers in ("compact", "float64"):
            model = nn.Sequential(nn.Linear(cols, rows).to(dtype))
            with torch.no_grad():
                model[0].weight.copy_(weight)
            net = create_network(model, algo="svdiff", preset=None, svd_buffers=buffers)
            with torch.no_grad():
                net.adapters["0"].delta.copy_(shifts)
            layers[buffers] = (model, net, net.adapters["0"])
        model, net, adapter = layers["compact"]
        assert adapter.tail is not None and adapter.tail.shape == (max(shape), 9)
        assert adapter.side == ("out" if rows < cols else None)
        delta = layers["float64"][2].delta_weight().double()
        expected = op(model[0], x, model[0].weight.double() + delta)
        for mode in ("bypass", "rebuild"):
            net.set_forward_mode(mode)
            assert fast(adapter, x.to(dtype)) == (mode == "bypass" and adapter.side is not None)
            out = model(x.to(dtype))
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
        torch.testing.assert_close(adapter.delta_weight().double(), delta, rtol=tol, atol=tol * delta.abs().max().item())


def test_compact_float32_error_grows_only_with_the_shift_to_sigma_ratio():
    """The output side recovers Vh·x as Uᵀ·(W·x)/σ, so a float32 host's rounding is amplified by g/σ
    (the documented bound: about ε·max|gᵢ/σᵢ| of the output). A layer with σ from 1 down to 1e-3
    (the float32 tail limit is 3.5e-4) and every shift 0.1: g/σ up to 100, the output still within
    2e-5 of the float64 result; the rebuild, recovering U by the same division, likewise."""
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))[0]
    vh = torch.linalg.qr(torch.randn(80, 24, generator=g, dtype=torch.float64))[0].T
    sigma = torch.logspace(0, -3, 24, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(80, 24))
    with torch.no_grad():
        model[0].weight.copy_(u @ torch.diag(sigma) @ vh)
    x = torch.randn(6, 80, generator=g)
    net = create_network(model, algo="svdiff", preset=None)
    adapter = net.adapters["0"]
    assert adapter.side == "out" and adapter.tail is None
    with torch.no_grad():
        adapter.delta.fill_(0.1)
    assert (adapter.gain(1.0).double() / adapter.S.double()).max() > 90
    expected = op(model[0], x.double(), model[0].weight.double() + naive_delta(model[0].weight, adapter.delta))
    for mode in ("bypass", "rebuild"):
        net.set_forward_mode(mode)
        torch.testing.assert_close(model(x).double(), expected, rtol=2e-5, atol=2e-5 * expected.abs().max().item())


@pytest.mark.parametrize("other", ["svdiff", "lora", "ia3"])
def test_compact_input_side_shares_the_host_with_other_networks(other, monkeypatch):
    """The input side maps the host's input, so it runs only beside bypasses that neither map the
    input nor read the pure host output (LoRA); beside (IA)³ or a second input-side SVDiff it
    rebuilds instead. Every case equals op(x, W + ΔW₁ + ΔW₂)."""
    model, x, base, net, adapter = make("linear", multiplier=0.8)
    assert adapter.side == "in"
    second = create_network(model, algo=other, preset=None, stack=True, multiplier=0.6)
    with torch.no_grad():
        for p in second.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(9), dtype=p.dtype) * 0.1)
    calls = []
    real = type(adapter).input_map
    monkeypatch.setattr(type(adapter), "input_map", lambda self, x, *a: calls.append(self) or real(self, x, *a))
    for network in (net, second):
        network.set_forward_mode("bypass")
    layer = model[0]
    if other == "svdiff":  # the multiplier sits inside the ReLU
        second_delta = naive_delta(layer.weight, second.adapters["0"].delta, 0.6)
    else:
        second_delta = 0.6 * second.adapters["0"].delta_weight()
    expected = op(layer, x, layer.weight.detach() + naive_delta(layer.weight, adapter.delta, 0.8) + second_delta)
    if other == "ia3":  # (IA)³ scales the bias too
        expected = expected + 0.6 * second.adapters["0"].delta_bias()
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    assert len(calls) == (1 if other == "lora" else 0)


def test_unbatched_conv_input_in_bypass():
    model, x, base, net, adapter = make("conv1d-k3")
    net.set_forward_mode("rebuild")
    expected = model(x[0])
    net.set_forward_mode("bypass")
    torch.testing.assert_close(model(x[0]), expected, rtol=1e-10, atol=1e-10)


def test_cost_model_picks_the_cheaper_path():
    model, x, base, net, adapter = make("linear", torch.float32, svd_buffers="float32")
    # Linear 48 → 80, r = 48: rebuilding ΔW costs 80·48·48; the bypass 48·(48 + 80 + 1) per token.
    assert adapter.rebuild_flops() == 80 * 48 * 48
    assert adapter.bypass_flops(10) == 10 * 48 * (48 + 80 + 1)
    with torch.no_grad():
        assert fast(adapter, torch.randn(29, 48))  # 29·6192 < 184320
        assert not fast(adapter, torch.randn(30, 48))
    # Training: 3 passes of the bypass against the rebuild plus the full weight gradient (48·80 a token).
    assert fast(adapter, torch.randn(12, 48))  # 3·12·6192 < 184320 + 12·3840
    assert not fast(adapter, torch.randn(13, 48))
    model, x, base, net, adapter = make("conv2d-k3", torch.float32, svd_buffers="float32")
    assert adapter.rebuild_flops() == 20 * 108 * 20 and adapter.bypass_flops(7) == 7 * 20 * (108 + 20 + 1)
    model, x, base, net, adapter = make("embedding", torch.float32, svd_buffers="float32")  # rows of U: cheap
    assert adapter.bypass_flops(14) == 14 * 12 * 13 and adapter.rebuild_flops() == 40 * 12 * 12
    with torch.no_grad():
        assert fast(adapter, x)
    # compact: two matmuls with the small factor per token (Linear 48 → 80 is tall: Vh, 48 × 48, on
    # the input; the 20 × 108 conv is wide: U, 20 × 20, on the output); a rebuild forms the r × r
    # map Vhᵀ·diag(g/σ)·Vh first, then W times it.
    model, x, base, net, adapter = make("linear", torch.float32)
    assert adapter.side == "in" and adapter.bypass_flops(10) == 10 * 2 * 48 * 48
    assert adapter.rebuild_flops() == 80 * 48 * 48 + 48**3
    with torch.no_grad():  # t·2·48² ≤ 128·48²: t ≤ 64 (a tie takes the fast path)
        assert fast(adapter, torch.randn(64, 48)) and not fast(adapter, torch.randn(65, 48))
    model, x, base, net, adapter = make("conv2d-k3", torch.float32)
    assert adapter.side == "out" and adapter.bypass_flops(7) == 7 * 2 * 20 * 20
    model, x, base, net, adapter = make("embedding", torch.float32)
    assert adapter.side == "emb" and adapter.bypass_flops(14) == 14 * 2 * 12 * 12
    for name, options in (("conv2d-groups2", {}), ("layernorm", {}), ("groupnorm", {"one_d": "direct"}),
                          ("linear", {"svd_buffers": "lean"}), ("conv2d-groups2", {"svd_buffers": "float32"})):
        model, x, base, net, adapter = make(name, torch.float32, **options)
        net.set_forward_mode("bypass")
        assert not has_fast_path(adapter) and not fast(adapter, x)


def test_identity_at_init_is_exact():
    for name in MATRIX_HOSTS + NORM_HOSTS:
        for options in ({}, {"one_d": "direct"}, {"svd_buffers": "lean"}):
            if "one_d" in options and name not in NORM_HOSTS:
                continue
            model, x, base, net, adapter = make(name, torch.float32, shifts_seed=None, **options)
            assert torch.equal(adapter.delta_weight(), torch.zeros_like(model[0].weight))
            for mode in ("rebuild", "bypass"):
                net.set_forward_mode(mode)
                for train in (True, False):
                    model.train(train)
                    assert torch.equal(model(x), base), (name, options, mode, train)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_equals_unmerged_rebuild_and_unmerge_is_bit_exact(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 12, 3, padding=1), nn.GroupNorm(3, 12), nn.Conv2d(12, 6, 1)).to(dtype)
    x = torch.randn(2, 4, 5, 5).to(dtype)
    original = {k: bits(v).clone() for k, v in model.state_dict().items()}
    net = create_network(model, algo="svdiff", preset=None, multiplier=0.6, forward_mode="rebuild")
    with torch.no_grad():
        for adapter, layer in zip(net, model):
            adapter.delta.copy_(clipping_shifts(layer.weight.float(), 7).float())
        unmerged = model(x)
        for cycle in range(3):
            net.merge()
            assert torch.equal(bits(model(x)), bits(unmerged))
            net.unmerge()
            assert all(torch.equal(bits(v), original[k]) for k, v in model.state_dict().items())


def test_rank_dropout_drops_whole_singular_components_in_training_only():
    model, x, base, net, adapter = make("linear", rank_dropout=0.5)
    full = adapter.delta_weight()
    net.train()
    model.train()
    torch.manual_seed(0)
    dropped = adapter.delta_weight(True)
    torch.manual_seed(0)
    keep = (torch.rand(adapter.rank) >= 0.5).double()
    assert 0 < keep.sum() < adapter.rank
    u, sigma, vh = naive_svd(model[0].weight)
    gain = (torch.clamp(sigma + adapter.delta.detach(), min=0) - sigma) * keep
    torch.testing.assert_close(dropped, u @ torch.diag(gain) @ vh, rtol=1e-10, atol=1e-12)
    assert torch.equal(adapter.delta_weight(), full)
    model.eval()
    assert torch.equal(adapter.delta_weight(True), full)


# --------------------------------------------------------------------- options and learning rates


def test_one_d_option_selects_norm_layers():
    def build(**options):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GroupNorm(2, 16), nn.Embedding(5, 8))
        return create_network(model, algo="svdiff", preset=None, **options)

    kinds = lambda net: sorted(a.host.kind for a in net)  # noqa: E731
    assert kinds(build()) == ["embedding", "groupnorm", "layernorm", "linear"]  # default "scalar"
    assert kinds(build(one_d="none")) == ["embedding", "linear"]
    scalar = build(one_d="scalar").file_state_dict()
    assert scalar["lycoris_1.delta"].shape == (1,) and scalar["lycoris_2.delta"].shape == (1,)
    direct = build(one_d="direct").file_state_dict()
    assert direct["lycoris_1.gain_delta"].shape == (16,) and "lycoris_1.delta" not in direct
    assert direct["lycoris_0.delta"].shape == (8,) and direct["lycoris_3.delta"].shape == (5,)
    with pytest.raises(ConfigError, match="one_d"):
        build(one_d="vector")
    with pytest.raises(ConfigError, match="svd_buffers"):
        build(svd_buffers="float16")
    with pytest.raises(ConfigError, match="weight_decompose"):
        build(weight_decompose=True)  # no DoRA
    assert {"one_d", "svd_buffers", "dropout", "rank_dropout"} <= get_algorithm("svdiff").option_names()


def test_default_learning_rates_in_parameter_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Conv2d(16, 4, 3), nn.GroupNorm(2, 4))
    for one_d in ("scalar", "direct"):
        net = create_network(model, algo="svdiff", preset=None, one_d=one_d)
        groups = {g["lr"]: {id(p) for p in g["params"]} for g in net.param_groups()}
        assert groups == {
            1e-3: {id(net.adapters["0"].delta), id(net.adapters["2"].delta)},
            1e-6: {id(shifts_of(net.adapters["1"])), id(shifts_of(net.adapters["3"]))},
        }
        torch.optim.AdamW(net.param_groups(), lr=1e-4)
        assert net.param_groups(lr=5e-3)[0]["lr"] == 5e-3
        net.remove()


def test_only_shifts_train():
    model, x, base, net, adapter = make("conv2d-k3", torch.float32)
    assert [n for n, _ in net.named_parameters()] == ["lycoris_0.delta"]
    assert not any(n.endswith(("U", "S", "Vh")) for n in net.state_dict())  # buffers are not persistent
    model.requires_grad_(False)
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        net.zero_grad()
        model(x).square().sum().backward()
        assert adapter.delta.grad is not None and adapter.delta.grad.abs().max() > 0
        assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------- our files

BUILD_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn
    def build():
        torch.manual_seed(11)
        return nn.Sequential(nn.Linear(24, 40), nn.Conv2d(6, 10, 3, padding=1), nn.Conv1d(6, 9, 2),
                             nn.Conv3d(3, 5, 2), nn.Embedding(30, 8), nn.LayerNorm(16), nn.GroupNorm(2, 6))
    """
)


def build_model() -> nn.Module:
    scope: dict = {}
    exec(BUILD_MODEL, scope)
    return scope["build"]()


def test_save_load_in_a_fresh_process_is_bit_exact(tmp_path):
    model = build_model()
    net = create_network(model, algo="svdiff", preset=None)
    with torch.no_grad():
        for adapter, layer in zip(net, model):
            adapter.delta.copy_(clipping_shifts(layer.weight, 4).float())
    path = net.save(tmp_path / "shifts.safetensors")
    expected = {k: a.delta_weight().detach() for k, a in net.adapters.items()}
    script = BUILD_MODEL + textwrap.dedent(
        f"""
        import sys
        from safetensors.torch import save_file
        torch.set_num_threads({torch.get_num_threads()})
        from lycoris_like import load_network
        import lycoris_like.modules.svdiff
        net = load_network(build(), {str(path)!r})
        save_file({{k: a.delta_weight().detach().contiguous() for k, a in net.adapters.items()}}, {str(tmp_path / "out.safetensors")!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    got = load_file(str(tmp_path / "out.safetensors"))
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert expected[key].abs().max() > 0
        assert torch.equal(bits(got[key]), bits(expected[key])), key


def test_file_layout_and_in_process_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GroupNorm(2, 16), nn.LayerNorm(16))
    x = torch.randn(3, 16, 8)
    for one_d in ("scalar", "direct"):
        net = create_network(model, algo="svdiff", preset=None, one_d=one_d, multiplier=0.8)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.linspace(-1.5, 1.0, p.numel()))
        expected = model(x)
        path = net.save(tmp_path / f"{one_d}.safetensors")
        written = net.file_state_dict()
        norm_key = "delta" if one_d == "scalar" else "gain_delta"
        assert {k: (tuple(v.shape), v.dtype) for k, v in written.items()} == {
            "lycoris_0.delta": ((8,), torch.float32), "lycoris_0.base_hash": ((), torch.int64),
            f"lycoris_1.{norm_key}": ((1,) if one_d == "scalar" else (16,), torch.float32),
            "lycoris_1.base_hash": ((), torch.int64),
            f"lycoris_2.{norm_key}": ((1,) if one_d == "scalar" else (16,), torch.float32),
            "lycoris_2.base_hash": ((), torch.int64),
        }
        with safe_open(str(path), "pt") as f:
            config = json.loads(f.metadata()["lycoris_like.config"])
        assert config["algo"] == "svdiff" and config["one_d"] == one_d
        net.remove()
        loaded = load_network(model, path, multiplier=0.8)
        assert [a.one_d for a in loaded][1:] == [one_d, one_d]
        assert torch.equal(bits(model(x)), bits(expected))
        assert all(torch.equal(bits(v), bits(written[k])) for k, v in loaded.file_state_dict().items())
        loaded.remove()
    # The checksum is an int64: a file saved in float16 still identifies its base.
    net = create_network(model, algo="svdiff", preset=None)
    path = net.save(tmp_path / "half.safetensors", dtype=torch.float16)
    net.remove()
    assert len(load_network(model, path)) == 3


def test_file_from_a_different_base_is_refused_and_the_model_untouched(tmp_path):
    model = build_model()
    net = create_network(model, algo="svdiff", preset=None)
    path = net.save(tmp_path / "a.safetensors")
    net.remove()
    other = build_model()
    with torch.no_grad():
        other[1].weight[0, 0, 0, 0] += 1e-3  # one entry of one layer differs
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(IncompatibleFileError, match="base model differs") as info:
        load_network(other, path)
    assert info.value.keys == ["lycoris_1.base_hash"]
    assert "lycoris_1.base_hash" in str(info.value)
    assert all(dispatch_of(m) is None for m in other.modules())
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())
    # The same base in half precision is refused too, with a hint.
    half = build_model().half()
    with pytest.raises(IncompatibleFileError, match="float16") as info:
        load_network(half, path)
    # (the default LayerNorm/GroupNorm gains are ones, exact in float16: those layers do match)
    assert info.value.keys == [f"lycoris_{i}.base_hash" for i in range(5)]
    loaded = load_network(build_model(), path)  # the right base loads
    assert len(loaded) == 7
    # A file without checksums (e.g. written by another tool) loads unchecked.
    tensors = {k: v for k, v in loaded.file_state_dict().items() if not k.endswith("base_hash")}
    loaded.remove()
    save_file(tensors, str(tmp_path / "unchecked.safetensors"))
    assert len(load_network(other, tmp_path / "unchecked.safetensors")) == 7


def test_bad_shift_tensors_are_refused_with_the_key(tmp_path):
    model = build_model()
    net = create_network(model, algo="svdiff", preset=None)
    tensors = net.file_state_dict()
    net.remove()
    bad = {**tensors, "lycoris_0.delta": torch.zeros(23)}
    save_file(bad, str(tmp_path / "short.safetensors"))
    with pytest.raises(ShapeMismatchError, match=r"lycoris_0\.delta.*\(24,\)"):
        load_network(model, tmp_path / "short.safetensors")
    bad = {**tensors, "lycoris_0.gain_delta": torch.zeros(24)}
    del bad["lycoris_0.delta"]
    save_file(bad, str(tmp_path / "gain.safetensors"))
    with pytest.raises(IncompatibleFileError, match=r"lycoris_0\.gain_delta"):
        load_network(model, tmp_path / "gain.safetensors")
    assert all(dispatch_of(m) is None for m in model.modules())


# --------------------------------------------------------------------- svdiff-pytorch files


class Tiny(nn.Module):
    """Named submodules, so svdiff-pytorch paths have dots: blocks.0, blocks.1.conv, …"""

    def __init__(self):
        super().__init__()
        torch.manual_seed(21)
        self.emb = nn.Embedding(20, 12)
        self.blocks = nn.Sequential(nn.Linear(12, 24), nn.ModuleDict({"conv": nn.Conv2d(4, 6, 3, padding=1)}))
        self.norm = nn.GroupNorm(2, 6)
        self.ln = nn.LayerNorm(12)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.ln.weight.uniform_(-1.0, 1.5)

    def forward(self, ids, image):
        h = self.blocks[0](self.ln(self.emb(ids)))
        return h, self.norm(self.blocks[1]["conv"](image))


PATHS = ["emb", "blocks.0", "blocks.1.conv", "norm", "ln"]


def tiny_inputs():
    g = torch.Generator().manual_seed(9)
    return torch.randint(0, 20, (2, 5), generator=g), torch.randn(2, 4, 6, 5, generator=g)


def upstream_forward(model: Tiny, shifts: dict, scale: float):
    """svdiff-pytorch's forward written out: every weight rebuilt as U·diag(ReLU(S + scale·δ))·Vh
    from an SVD of (co, cin·h·w) or γ.unsqueeze(0)."""
    weights = {}
    for path in PATHS:
        w = model.get_submodule(path).weight.detach().double()
        u, s, vh = naive_svd(w)
        updated = u @ torch.diag(torch.clamp(s + scale * shifts[f"{path}.delta"].double(), min=0)) @ vh
        weights[path] = updated.reshape(w.shape)
    ids, image = tiny_inputs()
    ln = model.ln
    h = F.layer_norm(weights["emb"][ids], ln.normalized_shape, weights["ln"], ln.bias.double(), ln.eps)
    h = F.linear(h, weights["blocks.0"], model.blocks[0].bias.double())
    conv = model.blocks[1]["conv"]
    y = F.conv2d(image.double(), weights["blocks.1.conv"], conv.bias.double(), padding=1)
    y = F.group_norm(y, 2, weights["norm"], model.norm.bias.double(), model.norm.eps)
    return h, y


def upstream_file(model: Tiny) -> dict:
    g = torch.Generator().manual_seed(13)
    out = {}
    for path in PATHS:
        w = model.get_submodule(path).weight
        r = 1 if w.dim() == 1 else min(w.shape[0], w[0].numel())
        out[f"{path}.delta"] = (torch.randn(r, generator=g) * 0.5).float()
    out["norm.delta"] = torch.tensor([-0.3])
    return out


def test_import_of_a_file_in_svdiff_pytorch_format(tmp_path):
    model = Tiny()
    shifts = upstream_file(model)
    save_file(shifts, str(tmp_path / "spectral_shifts.safetensors"))
    ids, image = tiny_inputs()
    base = model(ids, image)
    net = load_svdiff_pytorch(model, tmp_path / "spectral_shifts.safetensors", multiplier=0.7)
    assert sorted(net.adapters) == sorted(PATHS)
    got = model(ids, image)
    expected = upstream_forward(model, shifts, 0.7)
    for g, e, b in zip(got, expected, base):
        assert not torch.allclose(g, b)
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)


def test_svdiff_pytorch_round_trip(tmp_path):
    model = Tiny()
    net = create_network(model, algo="svdiff", preset=None)
    with torch.no_grad():
        for adapter in net:
            adapter.delta.copy_(torch.linspace(-0.8, 0.6, adapter.rank))
    path = save_svdiff_pytorch(net, tmp_path / "spectral_shifts.safetensors")
    with safe_open(str(path), "pt") as f:
        layout = {k: (tuple(f.get_tensor(k).shape), f.get_tensor(k).dtype) for k in f.keys()}
    assert layout == {"emb.delta": ((12,), torch.float32), "blocks.0.delta": ((12,), torch.float32),
                      "blocks.1.conv.delta": ((6,), torch.float32), "norm.delta": ((1,), torch.float32),
                      "ln.delta": ((1,), torch.float32)}
    expected = {p: a.delta_weight() for p, a in net.adapters.items()}
    net.remove()
    loaded = load_svdiff_pytorch(model, path)
    assert {p: bits(a.delta_weight()) for p, a in loaded.adapters.items()}.keys() == expected.keys()
    assert all(torch.equal(bits(a.delta_weight()), bits(expected[p])) for p, a in loaded.adapters.items())
    # Exported shifts and upstream's own forward agree.
    ids, image = tiny_inputs()
    for g, e in zip(model(ids, image), upstream_forward(model, load_file(str(path)), 1.0)):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)


def test_svdiff_pytorch_export_refuses_what_it_cannot_express(tmp_path):
    model = Tiny()
    net = create_network(model, algo="svdiff", preset=None, one_d="direct")
    with pytest.raises(ConfigError, match="norm"):
        save_svdiff_pytorch(net, tmp_path / "x.safetensors")
    net.remove()
    net = create_network(model, algo="lora", preset=None)
    with pytest.raises(ConfigError, match="spectral shifts only"):
        save_svdiff_pytorch(net, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_svdiff_pytorch_keys_that_match_nothing_are_refused(tmp_path):
    model = Tiny()
    ids, image = tiny_inputs()
    base = model(ids, image)
    good = upstream_file(model)
    cases = {
        "nothing": ({"blocks.7.delta": torch.zeros(3)}, IncompatibleFileError, r"blocks\.7\.delta"),
        "token": ({"modifier_tokens.<sks>": torch.zeros(12)}, IncompatibleFileError, "textual-inversion"),
        "no suffix": ({"blocks.0.weight": torch.zeros(12)}, IncompatibleFileError, r"blocks\.0\.weight"),
        "container": ({"blocks.delta": torch.zeros(3)}, IncompatibleFileError, "Sequential"),
        "shape": ({"blocks.0.delta": torch.zeros(24)}, ShapeMismatchError, r"blocks\.0\.delta.*\(12,\)"),
        "norm shape": ({"norm.delta": torch.zeros(6)}, ShapeMismatchError, "one scalar per norm"),
    }
    for label, (extra, error, message) in cases.items():
        tensors = {**good, **extra}
        save_file(tensors, str(tmp_path / "bad.safetensors"))
        with pytest.raises(error, match=message) as info:
            load_svdiff_pytorch(model, tmp_path / "bad.safetensors")
        assert list(extra)[0] in info.value.keys, label
        assert all(dispatch_of(m) is None for m in model.modules())
    for g, b in zip(model(ids, image), base):
        assert torch.equal(g, b)
    save_file({**good, "blocks.7.delta": torch.zeros(3)}, str(tmp_path / "partial.safetensors"))
    with pytest.warns(UserWarning, match=r"blocks\.7\.delta"):
        net = load_svdiff_pytorch(model, tmp_path / "partial.safetensors", strict=False)
    assert len(net) == len(PATHS)


def test_svdiff_pytorch_clip_paths_keep_text_model():
    """Upstream ran on transformers 4 (`text_model.` in every CLIP path); transformers 5 has no
    such level. Both spellings load; exports always write `text_model.`."""

    class CLIPTextModel(nn.Module):  # the transformers-5 layout, by class name
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embeddings = nn.ModuleDict({"position_embedding": nn.Embedding(7, 8)})
            self.encoder = nn.ModuleDict({"q_proj": nn.Linear(8, 8)})

    model = CLIPTextModel()
    tensors = {"text_model.embeddings.position_embedding.delta": torch.ones(7),
               "encoder.q_proj.delta": torch.ones(8)}
    net = network_from_svdiff_pytorch(model, tensors)
    assert sorted(net.adapters) == ["embeddings.position_embedding", "encoder.q_proj"]
    assert sorted(svdiff_pytorch_tensors(net)) == ["text_model.embeddings.position_embedding.delta",
                                                   "text_model.encoder.q_proj.delta"]
