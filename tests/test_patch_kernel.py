"""The in-place entry patch (kernels/patch.py) that SaRA's forward uses instead of copying the weight:
against the naive formula and against the copying rebuild path (bit-exact), the host's tensors
restored bit-exactly (also on errors), no version-counter bump, nothing weight-sized saved, and the
cases that fall back to the rebuild."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lycoris_like import create_network, hosts
from lycoris_like.hosts import HostLayer
from lycoris_like.kernels import sparse
from lycoris_like.kernels.patch import patched_op
from lycoris_like.modules.sara import SaRA
from lycoris_like.training import progressive_adjust

from conftest import bits, make_host, make_unet, randomize, reference_op, unet_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

THETA = 0.05  # with weights ~ N(0, 0.1²) about 40 % of the entries are selected


def sara_host(host_name: str, dtype=torch.float32, multiplier: float = 1.0, freeze: bool = False, **options):
    model, x = make_host(host_name, dtype)
    randomize(model, std=0.1, seed=4)
    model.requires_grad_(False)
    net = create_network(model, algo="sara", threshold=THETA, train_bias=True, multiplier=multiplier, **options)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(p.dtype) * 0.03)
    if freeze:  # a progressive adjustment: part of the entries frozen at their learned values
        progressive_adjust(net)
        assert any(a.sparse_weight.frozen_index.numel() for a in net)
    return model, x, net


def naive_adapted(module: nn.Module, part, multiplier: float) -> torch.Tensor:
    """P₀ + m·(v − P₀) on the selected entries (trained and frozen), spelled out in float64."""
    index, values, base = part.entries()
    flat = module.weight.detach().double().reshape(-1).clone()
    flat[index.long()] = base.double() + multiplier * (values.double() - base.double())
    return flat


def grads(model, x, params, g=None):
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(y.dtype) if g is None else g
    return y, torch.autograd.grad(y, [x, *params], g)


@pytest.fixture
def rebuild_only(monkeypatch):
    """Switch the patch off: SaRA then takes the copying rebuild path (`kernels.rebuild`)."""
    monkeypatch.setattr(SaRA, "entry_patches", lambda self, multiplier, train=False: None)


@pytest.mark.parametrize("multiplier", [1.0, 0.7])
@pytest.mark.parametrize("freeze", [False, True], ids=["trained", "frozen-part"])
def test_patched_forward_and_gradients_match_the_naive_formula_and_the_rebuild(host_name, multiplier, freeze, monkeypatch):
    model, x, net = sara_host(host_name, torch.float64, multiplier, freeze)
    module, adapter = model[0], net.adapters["0"]
    x = x.clone().requires_grad_(True)
    params = list(net.parameters())
    before = [bits(t).clone() for t in (module.weight, module.bias) if t is not None]
    version = module.weight._version

    y, got = grads(model, x, params)

    # the host's own tensors: the same bits and the same version as before
    assert all(torch.equal(bits(t), b) for t, b in zip((module.weight, module.bias), before))
    assert module.weight._version == version

    # naive: the dense adapted weight and bias in float64, then plain autograd through the layer
    w = naive_adapted(module, adapter.sparse_weight, multiplier).reshape(module.weight.shape).requires_grad_(True)
    b = None
    if module.bias is not None:
        b = module.bias.detach().double().clone()
        index, values, base = adapter.sparse_bias.entries()
        b[index.long()] = base + multiplier * (values - base)
        b.requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = reference_op(module, x2, w, b)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    gx, gw, *gb = torch.autograd.grad(ref, [x2, w] + ([b] if b is not None else []), g)
    torch.testing.assert_close(got[0], gx, rtol=1e-12, atol=1e-12)
    trained = adapter.sparse_weight
    torch.testing.assert_close(got[1], multiplier * gw.reshape(-1)[trained.index.long()], rtol=1e-12, atol=1e-12)
    if b is not None:
        torch.testing.assert_close(got[2], multiplier * gb[0][adapter.sparse_bias.index.long()], rtol=1e-12, atol=1e-12)

    # the copying rebuild: the very same bits
    monkeypatch.setattr(SaRA, "entry_patches", lambda self, multiplier, train=False: None)
    y2, expected = grads(model, x, params)
    assert torch.equal(bits(y), bits(y2))
    for a, e in zip(got, expected):
        assert torch.equal(bits(a), bits(e))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_patch_equals_the_rebuild_bit_exactly_in_every_dtype(dtype, monkeypatch):
    model, x, net = sara_host("conv2d-k3", dtype, multiplier=0.7)
    x = x.clone().requires_grad_(True)
    params = list(net.parameters())
    weight = bits(model[0].weight).clone()
    y, got = grads(model, x, params)
    assert torch.equal(bits(model[0].weight), weight)
    with torch.no_grad():
        y_eval = model(x)
    monkeypatch.setattr(SaRA, "entry_patches", lambda self, multiplier, train=False: None)
    y2, expected = grads(model, x, params)
    with torch.no_grad():
        y2_eval = model(x)
    assert torch.equal(bits(y), bits(y2)) and torch.equal(bits(y_eval), bits(y2_eval))
    for a, e in zip(got, expected):
        assert torch.equal(bits(a), bits(e))


def test_inference_modes_patch_and_restore(monkeypatch):
    model, x, net = sara_host("conv2d-reflect", multiplier=0.5)
    weight = bits(model[0].weight).clone()
    with torch.inference_mode():
        y_inf = model(x)
    with torch.no_grad():
        y_nograd = model(x)
    assert torch.equal(bits(model[0].weight), weight)
    monkeypatch.setattr(SaRA, "entry_patches", lambda self, multiplier, train=False: None)
    with torch.no_grad():
        y_rebuilt = model(x)
    assert torch.equal(bits(y_inf), bits(y_rebuilt)) and torch.equal(bits(y_nograd), bits(y_rebuilt))


def test_weights_are_restored_when_the_op_or_a_patch_raises():
    model, x, net = sara_host("linear")
    module, adapter = model[0], net.adapters["0"]
    weight, bias = bits(module.weight).clone(), bits(module.bias).clone()
    with pytest.raises(RuntimeError):
        model(torch.randn(3, 47))  # the host op fails while the entries are written in
    assert torch.equal(bits(module.weight), weight) and torch.equal(bits(module.bias), bias)

    def fails(old):
        raise ValueError("boom")

    patches = adapter.entry_patches(1.0) + [(1, adapter.sparse_bias.index, fails, None)]
    with pytest.raises(ValueError, match="boom"):  # the weight patch was written before the bias one failed
        patched_op(x, (module.weight, module.bias), patches, adapter.host.op, adapter.host.op_grads, adapter.host.weight_grad_at, [])
    assert torch.equal(bits(module.weight), weight) and torch.equal(bits(module.bias), bias)


def test_a_graph_that_saved_the_host_weight_still_backpropagates():
    """The writes bypass the version counter, and the values are back before anyone else reads them."""
    model, x, net = sara_host("linear")
    module = model[0]
    z = torch.randn(2, 48, requires_grad=True)
    other = F.linear(z, module.weight)  # saves the host weight for z's gradient
    y = model(x)
    (y.square().sum() + other.square().sum()).backward()
    torch.testing.assert_close(z.grad, 2 * other.detach() @ module.weight)


def test_a_host_changed_between_forward_and_backward_is_read_again_and_restored():
    """Backward takes the unchanged entries from P₀[M] instead of reading W, but not after W's
    version counter moved: then it reads W again, uses its new values for ∇x and puts them back."""
    model, x, net = sara_host("conv2d-k3", torch.float64)
    module, adapter = model[0], net.adapters["0"]
    x = x.clone().requires_grad_(True)
    y = model(x)
    with torch.no_grad():
        module.weight.mul_(1.5)  # in place, through the version counter
    changed = bits(module.weight).clone()
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(bits(module.weight), changed)  # not P₀[M] written over the new values

    w = module.weight.detach().clone().reshape(-1)
    index, values, base = adapter.sparse_weight.entries()
    w[index.long()] = values + (w[index.long()] - base)  # m = 1 on a changed host: v + (W[M] − P₀[M])
    x2 = x.detach().clone().requires_grad_(True)
    ref = reference_op(module, x2, w.reshape(module.weight.shape), module.bias)
    torch.testing.assert_close(gx, torch.autograd.grad(ref, x2, g)[0], rtol=1e-12, atol=1e-12)


def test_signed_zeros_under_the_mask_survive_the_patch():
    """The entries the patch restores are compared bitwise with P₀[M]: a −0.0 where P₀ holds +0.0
    is read and put back as −0.0, not replaced by P₀'s +0.0."""
    model, x = make_host("linear", torch.float32)
    randomize(model, std=0.1, seed=4)
    model.requires_grad_(False)
    with torch.no_grad():
        model[0].weight.view(-1)[::7] = 0.0
    net = create_network(model, algo="sara", threshold=THETA)
    with torch.no_grad():
        model[0].weight.view(-1)[::7] = -0.0
    weight = bits(model[0].weight).clone()
    x = x.clone().requires_grad_(True)
    model(x).square().sum().backward()
    assert torch.equal(bits(model[0].weight), weight)
    assert net.adapters["0"].sparse_weight.values.grad is not None


def test_fallbacks_rebuild_and_stay_correct(monkeypatch):
    """Where the patch does not apply — the host trains, rank dropout, two adapters on the host,
    autocast — the forward rebuilds, with the result of the naive formula."""
    calls = []
    original = SaRA.entry_patches
    monkeypatch.setattr(SaRA, "entry_patches", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))

    def naive_y(model, x, nets):
        module = model[0]
        w, b = (t.detach().double().reshape(-1).clone() for t in (module.weight, module.bias))
        for net in nets:
            for dense, part in ((w, net.adapters["0"].sparse_weight), (b, net.adapters["0"].sparse_bias)):
                if part is not None:
                    index, values, base = part.entries()
                    dense[index.long()] += values.double() - base.double()
        return reference_op(module, x.double(), w.reshape(module.weight.shape), b)

    model, x, net = sara_host("linear")
    model.requires_grad_(True)  # the host trains: its gradient must come out
    y = model(x)
    y.sum().backward()
    assert model[0].weight.grad is not None and not calls
    torch.testing.assert_close(y.double(), naive_y(model, x, [net]), rtol=1e-6, atol=1e-6)

    model, x, net = sara_host("linear", rank_dropout=0.5)
    net.train()
    model(x).sum().backward()
    assert calls == [1]  # asked, and it declined: a keep-mask per call
    assert SaRA.entry_patches(net.adapters["0"], 1.0, train=True) is None

    calls.clear()
    model, x, net = sara_host("linear")
    second = create_network(model, algo="sara", threshold=THETA, stack=True)
    randomize(second, std=0.1, seed=7)
    y = model(x)
    y.sum().backward()
    assert not calls
    torch.testing.assert_close(y.double(), naive_y(model, x, [net, second]), rtol=1e-6, atol=1e-6)

    model, x, net = sara_host("linear")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x.requires_grad_(True)).float().sum().backward()
    assert not calls


def test_updated_entries_short_cut_is_the_formula():
    """m = 1 on an unchanged base returns v without the float64 round trip: the same bits as the
    formula, for every dtype pairing SaRA uses; a changed base or m ≠ 1 takes the formula."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=g) * 0.01
    values = base + torch.randn(1000, generator=g) * 1e-3

    def formula(current, m):
        wide = torch.float64
        own = torch.lerp(base.to(wide), values.to(wide), torch.tensor(m, dtype=wide))
        return (own + (current.to(wide) - base.to(wide))).to(current.dtype)

    for dtype in (torch.float32, torch.float64):
        current = base.to(dtype)
        got = sparse.updated_entries(current, values, base, torch.tensor(1.0))
        assert torch.equal(bits(got), bits(formula(current, 1.0)))
    shifted = base + 1e-6
    assert torch.equal(bits(sparse.updated_entries(shifted, values, base, torch.tensor(1.0))), bits(formula(shifted, 1.0)))
    assert not torch.equal(sparse.updated_entries(shifted, values, base, torch.tensor(1.0)), values)
    got = sparse.updated_entries(base, values, base, torch.tensor(0.25))
    assert torch.equal(bits(got), bits(formula(base, 0.25)))
    m = torch.tensor(1.0, requires_grad=True)  # a trained multiplier keeps its gradient
    sparse.updated_entries(base, values, base, m).sum().backward()
    assert m.grad is not None


def test_unet_sara_step_saves_nothing_weight_sized_and_leaves_the_unet_untouched(monkeypatch):
    unet = make_unet().requires_grad_(False)
    randomize(unet, std=0.02, seed=3)
    unet.requires_grad_(False)
    net = create_network(unet, algo="sara", threshold=0.01)
    randomize(net, std=0.02, seed=4)
    state = {k: bits(v).clone() for k, v in unet.state_dict().items() if v.is_floating_point()}
    shapes = {tuple(a.host.weight.shape) for a in net}
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = unet(*unet_inputs()).sample
    out.square().mean().backward()
    assert not [s for s in saved if s in shapes]
    got = [p.grad.clone() for p in net.parameters()]
    assert all(torch.equal(bits(v), state[k]) for k, v in unet.state_dict().items() if k in state)

    net.zero_grad()
    monkeypatch.setattr(SaRA, "entry_patches", lambda self, multiplier, train=False: None)
    out2 = unet(*unet_inputs()).sample
    out2.square().mean().backward()
    assert torch.equal(bits(out), bits(out2))
    for a, p in zip(got, net.parameters()):
        assert torch.equal(bits(a), bits(p.grad))


@pytest.mark.parametrize("block", [1, 37, 1 << 22], ids=["row-blocks-1", "row-blocks-37", "one-block"])
def test_blockwise_weight_gradient_is_the_dense_one_at_the_indices(host_name, block, monkeypatch):
    """`HostLayer.weight_grad_at` in blocks of output rows against the naive layer's dense ∇W."""
    monkeypatch.setattr(hosts, "_GRAD_BLOCK", block)
    model, x = make_host(host_name, torch.float64)
    module = model[0]
    host = HostLayer.of(module)
    for inputs in (x, x[0]) if host.is_conv else (x,):  # convolutions: batched and unbatched
        w = module.weight.detach().clone().requires_grad_(True)
        y = reference_op(module, inputs, w)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        (dense,) = torch.autograd.grad(y, w, g)
        index = torch.randperm(w.numel(), generator=torch.Generator().manual_seed(4))[: w.numel() // 3].sort().values
        got = host.weight_grad_at(inputs, g, index)
        torch.testing.assert_close(got, dense.reshape(-1)[index], rtol=1e-12, atol=1e-12)
        assert host.weight_grad_at(inputs, g, index[:0]).shape == (0,)


def test_short_cut_keeps_the_gradient_of_a_trained_base():
    """At m = 1 the adapted entries are v + (current − P₀): a host weight that trains too still gets
    its gradient there (the short cut to v applies only to a constant base)."""
    base = torch.randn(6, dtype=torch.float64)
    values = (base + 0.1).requires_grad_(True)
    current = base.clone().requires_grad_(True)
    sparse.updated_entries(current, values, base, torch.tensor(1.0)).sum().backward()
    assert torch.equal(current.grad, torch.ones(6, dtype=torch.float64))
    assert torch.equal(values.grad, torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_patched_forward(reentrant):
    """torch.utils.checkpoint re-runs the forward in backward: the entries are written in again
    there, and the gradients equal the un-checkpointed ones bit-exactly."""
    from torch.utils.checkpoint import checkpoint

    model, x, net = sara_host("conv2d-k3", multiplier=0.7)
    x = x.clone().requires_grad_(True)
    params = list(net.parameters())
    weight = bits(model[0].weight).clone()
    y, expected = grads(model, x, params)
    y2 = checkpoint(model, x, use_reentrant=reentrant)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(y.dtype)
    y2.backward(g)  # reentrant checkpointing supports .backward() only
    got = [x.grad, *(p.grad for p in params)]
    assert torch.equal(bits(y), bits(y2))
    for a, e in zip(got, expected):
        assert torch.equal(bits(a), bits(e))
    assert torch.equal(bits(model[0].weight), weight)
