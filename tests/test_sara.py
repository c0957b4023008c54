"""SaRA: selection, unstructured backprop (no dense gradient or optimizer state), the masked-dense
AdamW oracle (with and without the nuclear-norm loss), progressive adjustment, exact scaling and
merging, gradient accumulation and clipping, files (ours, the official `unet.pt`, LyCORIS `diff`
export) and the typed errors for files that do not fit."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lycoris_like.modules.sara  # noqa: F401  (registers "sara")
from lycoris_like import ConfigError, CorruptFileError, IncompatibleFileError, MergeError, create_network, load_network
from lycoris_like.formats.container import read_safetensors, write_safetensors
from lycoris_like.interop import export_diff, load_official, save_diff
from lycoris_like.kernels.sparse import NuclearNorm, rounded_difference
from lycoris_like.modules.compose import adapted_parameters
from lycoris_like.modules.sara import SaRA
from lycoris_like.training import (
    SaRARankLoss,
    param_groups,
    progressive_adjust,
    progressive_schedule,
    rank_loss_candidates,
    sara_rank_loss,
)

from conftest import bits, make_host, make_unet, randomize, unet_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


THETA = 5e-3  # with weights ~ N(0, 0.01²) about 38 % of the entries are selected
ORACLE_HOSTS = ["linear", "conv1d-k3", "conv2d-k3", "conv2d-groups2", "conv2d-reflect", "conv3d-k1"]


def mlp(dtype=torch.float32, seed: int = 0) -> nn.Module:
    """Two Linear layers whose matrices are eligible for the rank loss (min side > 64), and one conv that is not."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(96, 80), nn.Tanh(), nn.Linear(80, 72), nn.Unflatten(1, (8, 9)), nn.Conv1d(8, 6, 3))
    randomize(model, std=0.01, seed=seed)
    return model.to(dtype)


MLP_INPUT = (5, 96)


def host_model(host: str, dtype=torch.float32, seed: int = 0):
    model, x = make_host(host, dtype, seed)
    randomize(model, std=0.01, seed=seed + 10)
    return model, x


def sara(model: nn.Module, theta: float = THETA, **options):
    model.requires_grad_(False)
    return create_network(model, algo="sara", threshold=theta, **options)


def below(t: torch.Tensor, theta: float = THETA) -> torch.Tensor:
    """The selection rule, spelled out: |t| < θ on float32 values (θ rounded to float32 as torch does)."""
    return t.detach().float().abs() < theta if t.dtype != torch.float64 else t.detach().abs() < float(torch.tensor(theta, dtype=torch.float32))


class MaskedDenseAdamW:
    """The reference: dense W, dense gradient masked to M, dense AdamW moments (torch's documented
    decoupled-weight-decay algorithm and operation order), the update applied only on M."""

    def __init__(self, params, masks, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        self.params, self.masks = list(params), list(masks)
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        for p, mask, m, v in zip(self.params, self.masks, self.exp_avg, self.exp_avg_sq):
            g = torch.where(mask, p.grad, torch.zeros_like(p.grad))
            new = p.detach().clone()
            new.mul_(1 - self.lr * self.wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / (1 - b2 ** float(self.t)) ** 0.5).add_(self.eps)
            new.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** float(self.t)))
            p.copy_(torch.where(mask, new, p))

    def shrink(self, masks):
        """Progressive adjustment in the reference: a smaller mask, moments unchanged."""
        self.masks = list(masks)


def reference_setup(model: nn.Module, trained: dict[str, torch.Tensor]):
    """A dense copy of `model` with every parameter trainable and the masks of the SaRA entries."""
    ref = copy.deepcopy(model).requires_grad_(True)
    params, masks = [], []
    for name, p in ref.named_parameters():
        params.append(p)
        masks.append(trained.get(name, torch.zeros_like(p, dtype=torch.bool)))
    return ref, params, masks


def masks_of(model: nn.Module, net, theta: float = THETA, bias: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for path in net.adapters:
        module = model.get_submodule(path)
        out[f"{path}.weight"] = below(module.weight, theta)
        if bias and module.bias is not None:
            out[f"{path}.bias"] = below(module.bias, theta)
    return out


def loss_of(model, x, target):
    return (model(x) - target).square().mean()


def state_of(net) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.bake().items()}


# ----------------------------------------------------------------------------- selection and storage


@pytest.mark.parametrize("host", ["linear", "conv1d-k3", "conv2d-k3", "conv2d-groups2", "conv3d-k3"])
def test_trainable_entries_are_exactly_the_small_ones(host):
    model, x = host_model(host)
    base_out = model(x)
    layer = model[0]
    net = sara(model, train_bias=True)
    adapter = net.adapters["0"]
    mask_w, mask_b = below(layer.weight), below(layer.bias)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trainable == int(mask_w.sum()) + int(mask_b.sum()) > 0
    assert 0 < int(mask_w.sum()) < layer.weight.numel()
    part = adapter.sparse_weight
    assert part.index.dtype == torch.int32 and part.index.dim() == 1
    assert torch.equal(part.index.long(), torch.nonzero(mask_w.reshape(-1)).reshape(-1))  # C order
    assert torch.equal(part.values.detach(), layer.weight.detach()[mask_w])
    assert all(b.dtype != torch.bool for b in net.buffers())  # never 1-byte masks
    held = sum(b.numel() for part in adapter.parts for b in part.buffers())
    assert held == 2 * trainable  # indices + base values, nothing dense
    assert torch.equal(model(x), base_out)  # identity at init


def test_threshold_is_strict_on_float32_values():
    model, _ = host_model("linear")
    theta32 = float(torch.tensor(THETA, dtype=torch.float32))
    just_below = float(torch.nextafter(torch.tensor(theta32), torch.tensor(0.0)))
    with torch.no_grad():
        model[0].weight[0, :4] = torch.tensor([theta32, -theta32, just_below, 0.0])
    net = sara(model)
    index = set(net.adapters["0"].sparse_weight.index.tolist())
    assert {0, 1}.isdisjoint(index) and {2, 3} <= index
    assert net.adapters["0"].threshold == theta32


def test_norm_layers_and_biases_are_options():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.LayerNorm(24), nn.Unflatten(1, (8, 3)), nn.GroupNorm(2, 8))
    randomize(model, std=0.01)
    model.requires_grad_(False)
    plain = create_network(model, algo="sara", threshold=THETA)
    assert sorted(plain.adapters) == ["0"] and plain.adapters["0"].sparse_bias is None
    plain.remove()
    net = create_network(model, algo="sara", threshold=THETA, train_norm=True, train_bias=True)
    assert sorted(net.adapters) == ["0", "1", "3"]
    expected = sum(int(below(p).sum()) for p in model.parameters())
    assert sum(p.numel() for p in net.parameters()) == expected
    x = torch.randn(4, 16)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    base = model(x)
    model.train()
    loss_of(model, x, torch.zeros_like(base)).backward()
    opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(model(x), base)
    baked = net.bake()
    for path in ("1", "3"):  # norm weights and biases change only on their masks
        for attr in ("weight", "bias"):
            old = getattr(model.get_submodule(path), attr)
            assert torch.equal(baked[f"{path}.{attr}"][~below(old)], old[~below(old)])


def test_a_tensor_without_small_entries_has_no_empty_parameter(tmp_path):
    """Nothing below θ (here the bias): the empty values are a buffer, so optimizers, DDP and FSDP
    (whose reduce fails on an empty parameter) see only tensors with something to train; the
    file still records the empty selection and loads back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24)).requires_grad_(False)
    with torch.no_grad():
        model[0].bias.fill_(1.0)
    fresh = copy.deepcopy(model)
    net = create_network(model, algo="sara", threshold=0.05, train_bias=True)
    adapter = net.adapters["0"]
    assert adapter.sparse_bias.nnz == 0 and adapter.sparse_weight.nnz > 0
    assert [p.numel() > 0 for p in net.parameters()] == [True]
    randomize(net, std=0.01)
    x = torch.randn(3, 16)
    out = model(x)
    net.save(tmp_path / "a.safetensors")
    loaded = load_network(fresh, tmp_path / "a.safetensors")
    assert loaded.adapters["0"].sparse_bias.nnz == 0
    assert torch.equal(fresh(x), out)


def test_options_and_learning_rate():
    model, _ = host_model("linear")
    net = sara(model, dim=64, alpha=3)  # accepted and ignored
    adapter = net.adapters["0"]
    assert adapter.config() == {"algo": "sara", "threshold": adapter.threshold, "train_bias": False,
                                "train_norm": False, "nnz": int(below(model[0].weight).sum())}
    (group,) = param_groups(net)
    assert group["lr"] == pytest.approx(1e-3 * math.exp(-350 * adapter.threshold), rel=1e-12)
    net.remove()
    assert SaRA(net.adapters["0"].host, threshold=2e-3).default_lr("sparse_weight.values") == pytest.approx(4.966e-4, rel=1e-3)
    for bad in (0, -1e-3, float("nan"), "x"):
        with pytest.raises(ConfigError, match="threshold"):
            create_network(model, algo="sara", threshold=bad)
    # rank_dropout drops individual trained entries' updates in training (SaRA has no rank).
    dropped = create_network(model, algo="sara", rank_dropout=0.5, stack=True)
    adapter = dropped.adapters["0"]
    with torch.no_grad():
        adapter.sparse_weight.values.add_(1.0)
    acc = model[0].weight.detach().double()
    torch.manual_seed(0)
    trained = adapter.add_delta(acc, 1.0, train=True)
    torch.manual_seed(0)
    keep = (torch.rand(adapter.sparse_weight.values.numel()) >= 0.5).double()
    index = adapter.sparse_weight.index.long()
    moved = (trained.reshape(-1)[index] - acc.reshape(-1)[index]) != 0
    assert torch.equal(moved, keep.bool())
    dropped.remove()
    with pytest.raises(ConfigError, match="weight_decompose"):
        create_network(model, algo="sara", weight_decompose=True)


# ----------------------------------------------------------------------------- unstructured backprop


def test_backward_and_step_leave_no_dense_state():
    model = mlp()
    net = sara(model, train_bias=True)
    x = torch.randn(*MLP_INPUT)
    opt = torch.optim.AdamW(net.param_groups())
    model.train()
    for _ in range(2):
        opt.zero_grad()
        loss_of(model, x, torch.zeros(5, 6, 7)).backward()
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    for adapter in net:
        for part, host_tensor in zip(adapter.parts, (adapter.host.weight, adapter.host.bias)):
            nnz = int(below(host_tensor).sum())
            if not nnz:  # nothing selected: a buffer, no parameter (see the test below)
                assert part.values.shape == (0,) and not isinstance(part.values, nn.Parameter)
                continue
            assert part.values.shape == (nnz,) and part.values.grad.shape == (nnz,)
            state = opt.state[part.values]
            assert state["exp_avg"].shape == (nnz,) and state["exp_avg_sq"].shape == (nnz,)
    # everything the optimizer and autograd keep: gradient + two moments per selected entry, one step counter
    nnz = sum(int(below(p).sum()) for p in model.parameters())
    held = sum(t.numel() for s in opt.state.values() for t in s.values()) + sum(p.grad.numel() for p in net.parameters())
    assert held == 3 * nnz + len(opt.state)


@pytest.mark.parametrize("host", ORACLE_HOSTS)
def test_adamw_steps_equal_masked_dense_adamw_exactly(host):
    """THE ORACLE: our SaRA under torch.optim.AdamW reaches bit-identical weights to dense AdamW whose
    gradient is masked to M and whose update is applied only on M (float32, weight decay on)."""
    model, x = host_model(host)
    net = sara(model, train_bias=True)
    ref, params, masks = reference_setup(model, masks_of(model, net, bias=True))
    target = torch.randn_like(model(x), generator=torch.Generator().manual_seed(4))
    hyper = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1)
    opt = torch.optim.AdamW(net.parameters(), **hyper)
    reference = MaskedDenseAdamW(params, masks, **hyper)
    model.train(), ref.train()
    for _ in range(4):
        opt.zero_grad()
        loss_of(model, x, target).backward()
        opt.step()
        ref.zero_grad()
        loss_of(ref, x, target).backward()
        reference.step()
        baked = net.bake()
        for name, p in ref.named_parameters():
            assert torch.equal(bits(baked[name]), bits(p)), name
    assert not torch.equal(net.bake()["0.weight"], model[0].weight)
    with torch.no_grad():
        assert torch.equal(bits(model(x)), bits(ref(x)))


def test_rank_loss_changes_the_trajectory_and_matches_the_nuclear_norm_reference():
    lam, seed, steps = 0.05, 3, 4
    hyper = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    x = torch.randn(*MLP_INPUT, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.randn(5, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def ours(weight):
        model = mlp(torch.float64)
        net = sara(model)
        opt = torch.optim.AdamW(net.parameters(), **hyper)
        rank_loss = SaRARankLoss(net, weight, seed=seed)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            (loss_of(model, x, target) + rank_loss()).backward()
            opt.step()
        return net.bake()

    model = mlp(torch.float64)
    net = sara(model)
    assert [id(a) for a in rank_loss_candidates(net)] == [id(net.adapters["0"]), id(net.adapters["2"])]
    ref, params, masks = reference_setup(model, masks_of(model, net))
    reference = MaskedDenseAdamW(params, masks, **hyper)
    eligible = ["0.weight", "2.weight"]
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ref.zero_grad()
        name = eligible[int(torch.randint(len(eligible), (1,), generator=g))]
        p, mask = dict(ref.named_parameters())[name], dict(zip([n for n, _ in ref.named_parameters()], masks))[name]
        nuclear = torch.linalg.matrix_norm(p * mask, ord="nuc")  # torch's own SVD backward
        (loss_of(ref, x, target) + lam * nuclear).backward()
        reference.step()
    with_rank, without = ours(lam), ours(0.0)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(with_rank[name], p.detach(), rtol=1e-10, atol=1e-13)
    assert (with_rank["0.weight"] - without["0.weight"]).abs().max() > 1e-4


def test_rank_loss_value_gradient_and_seeding():
    model = mlp(torch.float64)
    net = sara(model)
    loss = sara_rank_loss(net, 0.5, generator=torch.Generator().manual_seed(0))
    loss.backward()
    grads = {path: a.sparse_weight.values.grad for path, a in net.adapters.items()}
    chosen = [path for path, g in grads.items() if g is not None and bool(g.abs().sum() > 0)]
    assert len(chosen) == 1 and chosen[0] in ("0", "2")  # one matrix per call, and its v gets the gradient
    w = model.get_submodule(chosen[0]).weight
    masked = w * below(w)
    torch.testing.assert_close(loss, 0.5 * torch.linalg.svdvals(masked).sum(), rtol=1e-12, atol=0)
    u, _, vh = torch.linalg.svd(masked, full_matrices=False)
    torch.testing.assert_close(grads[chosen[0]], (0.5 * u @ vh)[below(w)], rtol=1e-9, atol=1e-12)
    draws = lambda seed: [float(sara_rank_loss(net, 1.0, generator=g).detach()) for g in [torch.Generator().manual_seed(seed)] for _ in range(6)]
    assert draws(7) == draws(7) and len(set(draws(7))) == 2  # reproducible, and both matrices drawn
    assert torch.equal(sara_rank_loss(net, 0.0), torch.zeros(()))
    conv_only = sara(host_model("conv2d-k3")[0])
    assert rank_loss_candidates(conv_only) == [] and torch.equal(sara_rank_loss(conv_only), torch.zeros(()))
    with pytest.raises(ConfigError):
        sara_rank_loss(net, -1.0)


def test_nuclear_norm_gradcheck():
    a = torch.randn(7, 5, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(NuclearNorm.apply, (a,))
    torch.testing.assert_close(NuclearNorm.apply(a), torch.linalg.matrix_norm(a, ord="nuc"))


# ----------------------------------------------------------------------------- accumulation and clipping


def test_gradient_accumulation_and_clip_grad_norm():
    model = mlp()
    net = sara(model, train_bias=True)
    xs = [torch.randn(*MLP_INPUT, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    target = torch.zeros(5, 6, 7)
    model.train()
    single = []
    for x in xs:
        net.zero_grad()
        loss_of(model, x, target).backward()
        single.append([p.grad.clone() for p in net.parameters()])
    net.zero_grad()
    for x in xs:  # accumulate over two backward passes
        loss_of(model, x, target).backward()
    for p, a, b in zip(net.parameters(), *single):
        torch.testing.assert_close(p.grad, a + b, rtol=1e-6, atol=1e-9)
    # the clipped norm is the norm of the dense gradient masked to M
    ref, params, masks = reference_setup(model, masks_of(model, net, bias=True))
    for x in xs:
        loss_of(ref, x, target).backward()
    dense_norm = torch.linalg.vector_norm(torch.cat([(p.grad * m).reshape(-1) for p, m in zip(params, masks)]))
    total = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=0.1 * float(dense_norm))
    torch.testing.assert_close(total, dense_norm, rtol=1e-5, atol=0)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad for p in net.parameters()]))
    torch.testing.assert_close(clipped, dense_norm * 0.1 * dense_norm / (dense_norm + 1e-6), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- progressive adjustment


def test_progressive_adjustment_shrinks_the_mask_and_the_optimizer_stays_exact():
    model, x = host_model("linear")
    net = sara(model, train_bias=True)
    adapter = net.adapters["0"]
    ref, params, masks = reference_setup(model, masks_of(model, net, bias=True))
    target = torch.randn_like(model(x), generator=torch.Generator().manual_seed(4))
    hyper = dict(lr=4e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    opt = torch.optim.AdamW(net.parameters(), **hyper)
    reference = MaskedDenseAdamW(params, masks, **hyper)
    handle = progressive_schedule(net, opt, at_step=3)
    old_index = {id(part): part.index.clone() for part in adapter.parts}
    model.train(), ref.train()
    for step in range(1, 7):
        opt.zero_grad()
        loss_of(model, x, target).backward()
        opt.step()  # the hook adjusts right after step 3
        ref.zero_grad()
        loss_of(ref, x, target).backward()
        reference.step()
        if step == 3:
            before = state_of(net)
            # the reference shrinks too: M ← M ∧ (|W| < θ)
            reference.shrink([m & below(p) for p, m in zip(params, masks)])
            frozen = sum(int((m & ~below(p)).sum()) for p, m in zip(params, masks))
            assert frozen > 0
            for part in adapter.parts:
                kept = set(part.index.tolist())
                assert kept < set(old_index[id(part)].tolist())  # a strict subset
                assert kept | set(part.frozen_index.tolist()) == set(old_index[id(part)].tolist())
                assert torch.equal(part.values.detach().abs() < adapter.threshold, torch.ones_like(part.values, dtype=torch.bool))
                state = opt.state[part.values]
                assert state["exp_avg"].shape == part.values.shape == state["exp_avg_sq"].shape == part.values.grad.shape
            assert sum(p.numel() for p in net.parameters()) == sum(int(m.sum()) for m in reference.masks)
            for name, w in before.items():  # adjusting changes no weight
                assert torch.equal(bits(w), bits(dict(ref.named_parameters())[name].detach()))
        baked = net.bake()
        for name, p in ref.named_parameters():
            assert torch.equal(bits(baked[name]), bits(p)), (step, name)
    handle.remove()
    assert progressive_adjust(net, opt) >= 0
    with pytest.raises(ConfigError, match="at_step"):
        progressive_schedule(net, opt, at_step=-1)


def test_frozen_entries_survive_save_and_load(tmp_path):
    model, x = host_model("conv2d-k3")
    net = sara(model)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    model.train()
    loss_of(model, x, torch.zeros_like(model(x))).backward()
    opt.step()
    assert progressive_adjust(net, opt) > 0
    expected = model(x)
    net.save(tmp_path / "s.safetensors")
    fresh, _ = host_model("conv2d-k3")
    loaded = load_network(fresh, tmp_path / "s.safetensors")
    part = loaded.adapters["0"].sparse_weight
    assert part.values.numel() == int(below(fresh[0].weight).sum()) and part.frozen_index.numel() == 0
    assert torch.equal(bits(fresh(x)), bits(expected))


# ----------------------------------------------------------------------------- scale and merge


def trained(model, x, steps=2, **options):
    net = sara(model, **options)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, x, torch.zeros_like(model(x))).backward()
        opt.step()
    model.eval()
    return net


def correctly_rounded(exact: list[Fraction], dtype: torch.dtype) -> torch.Tensor:
    """Each rational rounded to the nearest `dtype` value (ties to even), from its neighbours."""
    int_type = {2: torch.int16, 4: torch.int32}[torch.empty((), dtype=dtype).element_size()]
    out = []
    for q in exact:
        guess = torch.tensor(float(q), dtype=torch.float64).to(dtype)
        raw = guess.view(int_type)
        candidates = [guess] + [(raw + d).view(dtype) for d in (-1, 1)]
        out.append(min(candidates, key=lambda c: (abs(Fraction(float(c)) - q), int(c.view(int_type)) & 1)))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multiplier_scales_delta_and_merges_are_exact(dtype):
    model, x = host_model("conv2d-groups2", dtype)
    layer = model[0]
    base_w, base_b = layer.weight.detach().clone(), layer.bias.detach().clone()
    net = trained(model, x, train_bias=True)
    adapter = net.adapters["0"]
    mask = below(base_w)
    values = adapter.sparse_weight.values.detach()
    p0 = [Fraction(float(t)) for t in base_w[mask]]
    v = [Fraction(float(t)) for t in values]
    for m in (0.0, 1.0, 0.5, -0.7, 2.0, 0.3):
        net.set_multiplier(m)
        w = net.bake()["0.weight"]
        m = Fraction(float(torch.tensor(m, dtype=torch.float32)))  # SaRA takes the multiplier as a float32 value
        expected = correctly_rounded([a + m * (b - a) for a, b in zip(p0, v)], dtype)  # P₀ + m·ΔP, rounded once
        assert torch.equal(bits(w[mask]), bits(expected)), float(m)
        assert torch.equal(bits(w[~mask]), bits(base_w[~mask]))
    net.set_multiplier(1.0)
    w = net.bake()["0.weight"]
    assert torch.equal(bits(w[mask]), bits(adapter.sparse_weight.values.detach().to(dtype)))  # the trained values
    assert torch.equal(bits(w[~mask]), bits(base_w[~mask]))
    net.set_multiplier(0.0)
    with torch.no_grad():
        assert torch.equal(bits(model(x)), bits(layer._conv_forward(x, base_w, base_b)))
    net.set_multiplier(0.8)
    with torch.no_grad():
        unmerged = model(x)
        net.merge()
        assert torch.equal(bits(model(x)), bits(unmerged))
        net.unmerge()
    assert torch.equal(bits(layer.weight), bits(base_w)) and torch.equal(bits(layer.bias), bits(base_b))


def test_several_sara_networks_add_and_unmerge_in_reverse_order():
    model, x = host_model("linear")
    layer = model[0]
    base = layer.weight.detach().clone()
    first = trained(model, x)
    second = trained(model, x, theta=2 * THETA, stack=True)  # masks of different θ are nested
    a1, a2 = first.adapters["0"], second.adapters["0"]
    assert set(a1.sparse_weight.index.tolist()) < set(a2.sparse_weight.index.tolist())
    m1, m2 = (float(torch.tensor(m, dtype=torch.float32)) for m in (0.6, 0.3))
    first.set_multiplier(m1)
    second.set_multiplier(m2)
    exact = (base.double() + m1 * a1.sparse_weight.delta(torch.float64) + m2 * a2.sparse_weight.delta(torch.float64)).float()
    stacked, _ = adapted_parameters(a1.host, [a1, a2], [a1.multiplier_value, a2.multiplier_value])
    assert torch.equal(bits(stacked), bits(exact))  # Σ αᵢΔPᵢ in float64, rounded once
    with torch.no_grad():
        out = model(x)
        assert torch.equal(bits(out), bits(F.linear(x, exact, layer.bias)))
        first.merge()
        second.merge()  # sequential merges round to float32 in between: an ulp of the weights
        torch.testing.assert_close(layer.weight, exact, rtol=0, atol=float(spacing(base.abs().max())))
        torch.testing.assert_close(model(x), out, rtol=1e-6, atol=1e-8)
        with pytest.raises(MergeError, match="reverse order"):
            first.unmerge()
        second.unmerge()
        first.unmerge()
    assert torch.equal(bits(layer.weight), bits(base))


# ----------------------------------------------------------------------------- our files


def test_save_load_is_bit_exact_and_keys_are_compact(tmp_path):
    model, x = host_model("conv2d-k3")
    net = trained(model, x, train_bias=True)
    expected = model(x)
    net.save(tmp_path / "s.safetensors")
    tensors, meta = read_safetensors(tmp_path / "s.safetensors")
    nnz = int(below(model[0].weight).sum())
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items() if not k.startswith("lycoris_0.sara_b")} == {
        "lycoris_0.sara_threshold": (torch.float32, ()),
        "lycoris_0.sara_values": (torch.float32, (nnz,)),
        "lycoris_0.sara_indices": (torch.int32, (nnz,)),
        "lycoris_0.sara_nnz": (torch.int64, ()),
        "lycoris_0.sara_checksum": (torch.int64, ()),
    }
    fresh, _ = host_model("conv2d-k3")
    loaded = load_network(fresh, tmp_path / "s.safetensors")
    assert torch.equal(bits(fresh(x)), bits(expected))
    assert loaded.adapters["0"].sparse_bias is not None
    for a, b in zip(loaded.parameters(), net.parameters(), strict=True):
        assert torch.equal(bits(a), bits(b))
    net.save(tmp_path / "h.safetensors", dtype=torch.float16)  # half-precision values, θ kept exact
    tensors, _ = read_safetensors(tmp_path / "h.safetensors")
    assert tensors["lycoris_0.sara_values"].dtype == torch.float16
    assert tensors["lycoris_0.sara_threshold"].dtype == torch.float32
    target, _ = host_model("conv2d-k3")
    halved = load_network(target, tmp_path / "h.safetensors")
    mask = below(target[0].weight)
    assert torch.equal(bits(halved.bake()["0.weight"][mask]), bits(net.adapters["0"].sparse_weight.values.detach().half().float()))


def bad_file_cases(good: dict[str, torch.Tensor]):
    v, i = good["lycoris_0.sara_values"], good["lycoris_0.sara_indices"]
    yield "wrong nnz", {"lycoris_0.sara_nnz": torch.tensor(v.numel() + 1)}, "lycoris_0.sara_nnz"
    yield "short values", {"lycoris_0.sara_values": v[:-1], "lycoris_0.sara_indices": i[:-1],
                           "lycoris_0.sara_nnz": torch.tensor(v.numel() - 1)}, "lycoris_0.sara_nnz"
    yield "out of range", {"lycoris_0.sara_indices": torch.cat([i[:-1], torch.tensor([10**6], dtype=torch.int32)])}, "lycoris_0.sara_indices"
    yield "negative", {"lycoris_0.sara_indices": torch.cat([torch.tensor([-1], dtype=torch.int32), i[1:]])}, "lycoris_0.sara_indices"
    yield "unsorted", {"lycoris_0.sara_indices": i.flip(0)}, "lycoris_0.sara_indices"
    yield "other entries", {"lycoris_0.sara_indices": i + 1 if int(i[-1]) + 1 < 80 * 48 else i - 1}, "lycoris_0.sara_indices"
    yield "checksum", {"lycoris_0.sara_checksum": good["lycoris_0.sara_checksum"] + 1}, "lycoris_0.sara_checksum"
    yield "float indices", {"lycoris_0.sara_indices": i.float()}, "lycoris_0.sara_indices"
    yield "half threshold", {"lycoris_0.sara_threshold": good["lycoris_0.sara_threshold"].half()}, "lycoris_0.sara_threshold"
    yield "no threshold", {"lycoris_0.sara_threshold": None}, "lycoris_0.sara_threshold"


def test_bad_files_raise_typed_errors_naming_the_key(tmp_path):
    model, x = host_model("linear")
    net = trained(model, x)
    net.save(tmp_path / "good.safetensors")
    good, _ = read_safetensors(tmp_path / "good.safetensors")
    for what, change, key in bad_file_cases(good):
        tensors = {k: v for k, v in {**good, **change}.items() if v is not None}
        write_safetensors(tmp_path / "bad.safetensors", tensors, {})
        target, _ = host_model("linear")
        with pytest.raises(IncompatibleFileError) as info:
            load_network(target, tmp_path / "bad.safetensors")
        assert key in info.value.keys and key in str(info.value), what
        assert "forward" not in target[0].__dict__  # nothing attached
    # a different base: another model, a float16 or bfloat16 copy of the same one
    for other in (host_model("linear", seed=5)[0], host_model("linear")[0].half(), host_model("linear")[0].bfloat16()):
        with pytest.raises(IncompatibleFileError, match="different base|half precision") as info:
            load_network(other, tmp_path / "good.safetensors")
        assert any(k.startswith("lycoris_0.sara_") for k in info.value.keys)
    # a bias in the file for a layer without one
    nobias, _ = make_host("linear-nobias")
    with torch.no_grad():
        nobias[0].weight.copy_(host_model("linear")[0][0].weight)
    biased = trained(host_model("linear")[0], x, train_bias=True)
    biased.save(tmp_path / "b.safetensors")
    with pytest.raises(IncompatibleFileError, match="sara_b_values"):
        load_network(nobias, tmp_path / "b.safetensors")


# ----------------------------------------------------------------------------- the official unet.pt


def official_checkpoint(model: nn.Module, theta: float, seed: int = 0, with_threshold: bool = True):
    """What the official code saves: {position in model.parameters(): P[|P₀| < θ]} (+ 'threshold'),
    with P a 'trained' copy of the parameters; returns the dict and the trained parameters."""
    g = torch.Generator().manual_seed(seed)
    state, trained_params = {}, {}
    for i, (name, p) in enumerate(model.named_parameters()):
        p = p.detach()
        mask = p.abs() < theta
        new = p.clone()
        new[mask] = p[mask] + 0.01 * torch.randn(int(mask.sum()), generator=g)
        state[i] = new[mask].clone()
        trained_params[name] = new
    if with_threshold:
        state["threshold"] = theta
    return state, trained_params


def test_official_checkpoint_imports_onto_a_diffusers_unet(tmp_path):
    theta = 0.02
    unet = make_unet().requires_grad_(False)
    state, trained_params = official_checkpoint(unet, theta)
    torch.save(state, tmp_path / "unet.pt")
    sample, t, ctx = unet_inputs()
    with torch.no_grad():
        base_out = unet(sample, t, ctx).sample
    net = load_official(unet, tmp_path / "unet.pt")
    kinds = {a.host.kind for a in net}
    assert {"linear", "conv2d", "groupnorm", "layernorm"} <= kinds
    assert any(a.sparse_bias is not None for a in net)
    baked = net.bake()
    for name, p in trained_params.items():  # every parameter, bit-exactly: W[M] = file values
        assert torch.equal(bits(baked[name]), bits(p)), name
    reference = make_unet().requires_grad_(False)
    reference.load_state_dict(trained_params, strict=False)
    with torch.no_grad():
        out = unet(sample, t, ctx).sample
        torch.testing.assert_close(out, reference(sample, t, ctx).sample, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, base_out)
    # our own file round trip and the LyCORIS diff export of the same network
    net.save(tmp_path / "ours.safetensors")
    fresh = make_unet().requires_grad_(False)
    load_network(fresh, tmp_path / "ours.safetensors")
    with torch.no_grad():
        assert torch.equal(bits(fresh(sample, t, ctx).sample), bits(out))


def edge_mlp():
    """`mlp()` with one weight just below θ = 0.02 in float32 that float16 rounds to above it."""
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = 0.019999
    assert float(model[0].weight[0, 0].detach().half()) >= 0.02
    return model


def test_official_checkpoint_errors(tmp_path):
    theta = 0.02
    mlp = edge_mlp
    model = mlp()
    state, _ = official_checkpoint(model, theta)
    cases = {
        "nnz": ({**state, 0: state[0][:-1]}, IncompatibleFileError, "0 (0.weight)"),
        "position": ({**state, 99: torch.zeros(3)}, IncompatibleFileError, "99"),
    }
    for what, (bad, error, key) in cases.items():
        torch.save(bad, tmp_path / "bad.pt")
        target = mlp()
        with pytest.raises(error) as info:
            load_official(target, tmp_path / "bad.pt")
        assert key in info.value.keys, what
        assert all("forward" not in m.__dict__ for m in target.modules())
    no_theta = {k: v for k, v in state.items() if k != "threshold"}
    with pytest.raises(ConfigError, match="threshold"):
        load_official(mlp(), no_theta)
    assert len(load_official(mlp(), no_theta, threshold=theta)) == 3
    with pytest.raises(ConfigError, match="threshold"):
        load_official(mlp(), state, threshold=2 * theta)
    with pytest.raises(IncompatibleFileError):  # a half-precision base flips mask entries
        load_official(mlp().half(), state)
    torch.save({0: nn.Linear(2, 2)}, tmp_path / "pickle.pt")  # not loadable with weights_only=True
    with pytest.raises(CorruptFileError):
        load_official(mlp(), tmp_path / "pickle.pt")
    torch.save({"a": torch.zeros(2)}, tmp_path / "keys.pt")
    with pytest.raises(CorruptFileError):
        load_official(mlp(), tmp_path / "keys.pt")


# ----------------------------------------------------------------------------- LyCORIS diff export


def test_export_as_lycoris_diff_reproduces_our_merge(tmp_path):
    model = mlp()
    x = torch.randn(*MLP_INPUT)
    net = trained(model, x, train_bias=True)
    net.set_multiplier(0.7)
    expected = model(x)
    tensors = export_diff(net, multiplier=0.7)
    assert sorted(tensors) == sorted(f"lycoris_{p}.{s}" for p in ("0", "2", "4") for s in ("diff", "diff_b"))
    save_diff(net, tmp_path / "d.safetensors", multiplier=0.7)
    fresh = mlp()
    full = load_network(fresh, tmp_path / "d.safetensors")
    assert {a.algo for a in full} == {"full"}
    ours, theirs = net.bake(), full.bake()
    for name, w in ours.items():  # float32 W + diff is our merge up to the consumer's own rounding
        base, diff = mlp().state_dict()[name], tensors[name.replace(".", "_", 0).join(["lycoris_", ""])
                                                       .replace(".weight", ".diff").replace(".bias", ".diff_b")]
        assert (theirs[name] - w).abs().le(spacing(torch.maximum(base.abs(), diff.abs()))).all(), name
    assert torch.equal(bits(mlp().state_dict()["0.weight"] + tensors["lycoris_0.diff"]), bits(theirs["0.weight"]))
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-7)
    norm_model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    randomize(norm_model, std=0.01)
    norm_net = sara(norm_model, train_norm=True, train_bias=True)
    assert sorted(export_diff(norm_net)) == ["lycoris_0.diff", "lycoris_0.diff_b", "lycoris_1.b_norm", "lycoris_1.w_norm"]
    net.merge()
    with pytest.raises(ConfigError, match="unmerge"):
        export_diff(net)


def spacing(t: torch.Tensor) -> torch.Tensor:
    """The float32 ulp at |t|."""
    return torch.nextafter(t.abs(), torch.full_like(t, float("inf"))) - t.abs()


def test_rounded_difference_is_exact_where_float32_allows():
    g = torch.Generator().manual_seed(0)
    base = (torch.rand(50000, generator=g) * 2 - 1) * 2e-3
    close = base + 1e-4 * torch.randn(50000, generator=g)  # a small change: representable
    far = (torch.rand(50000, generator=g) * 2 - 1) * 2e-3  # sign changes: often off base's grid
    assert torch.equal(base + rounded_difference(base, close), close)
    d = rounded_difference(base, far)
    assert torch.equal(d, (far.double() - base.double()).float())
    assert ((base + d) - far).abs().le(spacing(torch.maximum(base.abs(), d.abs()))).all()


def test_export_of_an_svdiff_network_as_lycoris_diff(tmp_path):
    pytest.importorskip("lycoris_like.modules.svdiff")
    model = mlp()
    x = torch.randn(*MLP_INPUT)
    net = create_network(model, algo="svdiff")
    randomize(net, std=0.05, seed=3)
    net.set_multiplier(0.8)
    with torch.no_grad():
        expected = model(x)
    save_diff(net, tmp_path / "d.safetensors", multiplier=0.8)
    fresh = mlp()
    full = load_network(fresh, tmp_path / "d.safetensors")
    assert {a.algo for a in full} == {"full"} and len(full) == 3
    with torch.no_grad():
        assert not torch.allclose(fresh(x), mlp()(x))
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-7)
