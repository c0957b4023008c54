"""Exactness as properties (issue 7): hypothesis draws the algorithm and its options, the rank and
α, the layer type and its geometry (features, kernel, stride, dilation, groups, padding mode,
bias, batched or not), the dtype and the adapter's values, and checks

- identity at init: the adapted layer's output equals the base output exactly (train and eval,
  rebuild and bypass, with dropout options on);
- merged ≡ unmerged: the merged forward has the unmerged rebuild forward's exact bits, and the
  bypass forward agrees to float tolerance;
- unmerge restores the host weight bit-exactly after 100 merge/unmerge cycles in bf16/fp16/fp32;
- save → load reproduces the file tensors and both forwards bit-exactly;
- multiplier: m = 0 is the base exactly; linear algorithms (all but `NONLINEAR_MULTIPLIER`) scale linearly;
- fp16 merges compute in fp32: they succeed, within one fp16 ulp of the fp64 result, wherever the
  final weight is finite, and refuse (`MergeError`, every weight left bit-identical) wherever it is not.

Then, per algorithm: a ΔW beyond fp16's range that lands on a finite weight merges, and a merge
that would create NaN/Inf in one layer refuses and leaves every layer bit-identical (layers already
written in place are put back, and a network merged earlier still unmerges).

Example counts are bounded for CI (25 per property, `PROPERTY` below); `LYCORIS_LIKE_PROPERTY_EXAMPLES=2000`
runs a long, randomized search by hand.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st
from torch import nn

from lycoris_like import MergeError, create_network, get_algorithm, load_network

from conftest import NONLINEAR_MULTIPLIER, bits, randomize, search_settings
from test_hostile_files import all_variants

pytestmark = pytest.mark.usefixtures("one_thread")

PROPERTY = search_settings("LYCORIS_LIKE_PROPERTY_EXAMPLES", ci_examples=25)

VARIANTS = all_variants()
LOW = [torch.float32, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------- strategies


@dataclass
class Layer:
    """A host layer to build (in a Sequential, so it has a path) and an input for it."""

    kind: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    integer_input: int = 0  # > 0: an index input below this bound (Embedding)
    text: str = ""

    def make(self, dtype: torch.dtype, seed: int) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(seed)
        model = nn.Sequential(self.build()).to(dtype).eval()
        g = torch.Generator().manual_seed(seed + 1)
        if self.integer_input:
            x = torch.randint(0, self.integer_input, self.input_shape, generator=g)
        else:
            x = torch.randn(self.input_shape, generator=g, dtype=torch.float64).to(dtype)
        return model, x


@st.composite
def layers(draw, kinds: frozenset[str]) -> Layer:
    kind = draw(st.sampled_from(sorted(kinds)))
    batch = draw(st.sampled_from([(), (1,), (2,), (3,)]))
    if kind == "linear":
        inp, out, bias = draw(st.integers(1, 20)), draw(st.integers(1, 20)), draw(st.booleans())
        lead = draw(st.lists(st.integers(1, 3), max_size=2))
        return Layer(kind, lambda: nn.Linear(inp, out, bias=bias), (*batch, *lead, inp),
                     text=f"Linear({inp}, {out}, bias={bias}) on {(*batch, *lead, inp)}")
    if kind.startswith("conv"):
        d = int(kind[4])
        groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
        cin, cout = groups * draw(st.integers(1, 4)), groups * draw(st.integers(1, 4))
        kernel = tuple(draw(st.integers(1, 3 if d < 3 else 2)) for _ in range(d))
        stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular", "replicate"]))
        padding = tuple(draw(st.integers(0, dilation * (k - 1) // 2 + (mode == "zeros"))) for k in kernel)
        sizes = tuple(max(1, dilation * (k - 1) + 1 - 2 * p, p + 1) + draw(st.integers(0, 3 if d < 3 else 1))
                      for k, p in zip(kernel, padding))
        bias = draw(st.booleans())
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
        text = (f"{cls.__name__}({cin}, {cout}, {kernel}, stride={stride}, padding={padding}, dilation={dilation}, "
                f"groups={groups}, bias={bias}, padding_mode={mode!r}) on {(*batch, cin, *sizes)}")
        return Layer(kind, lambda: cls(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation,
                                       groups=groups, bias=bias, padding_mode=mode), (*batch, cin, *sizes), text=text)
    if kind == "embedding":
        num, dim = draw(st.integers(2, 16)), draw(st.integers(1, 12))
        pad = draw(st.sampled_from([None, 0]))
        return Layer(kind, lambda: nn.Embedding(num, dim, padding_idx=pad), (*batch, draw(st.integers(1, 5))), num,
                     text=f"Embedding({num}, {dim}, padding_idx={pad})")
    if kind == "layernorm":
        dim = draw(st.integers(2, 16))
        return Layer(kind, lambda: nn.LayerNorm(dim), (*batch, draw(st.integers(1, 4)), dim), text=f"LayerNorm({dim})")
    groups, per = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    return Layer(kind, lambda: nn.GroupNorm(groups, groups * per), (batch[0] if batch else 1, groups * per, 5),
                 text=f"GroupNorm({groups}, {groups * per})")


def with_sparse_threshold(algo: str, options: dict) -> dict:
    """SaRA's default θ = 2e-3 (and the matrix's 0.02) may select no entry of these small layers:
    use one that selects many."""
    if algo == "sara":
        return {**options, "threshold": 0.2}
    return options


@dataclass
class Case:
    variant: str
    algo: str
    options: dict
    dim: int
    alpha: float | None
    layer: Layer
    seed: int
    std: float

    def build(self, dtype: torch.dtype, **extra):
        model, x = self.layer.make(dtype, self.seed)
        options = with_sparse_threshold(self.algo, self.options)
        net = create_network(model, algo=self.algo, dim=self.dim, alpha=self.alpha, **options, **extra)
        return model, x, net

    def randomize(self, net) -> None:
        randomize(net, std=self.std, seed=self.seed + 2)


@st.composite
def cases(draw, algos: Callable[[str], bool] = lambda name: True) -> Case:
    variant = draw(st.sampled_from(sorted(v for v in VARIANTS if algos(v))))
    algo, options = VARIANTS[variant]
    kinds = frozenset(get_algorithm(algo).kinds_for(options))
    case = Case(variant, algo, dict(options), draw(st.integers(1, 6)), draw(st.sampled_from([None, 0.5, 1.0, 3.0, 8.0])),
                draw(layers(kinds)), draw(st.integers(0, 2**16)), draw(st.sampled_from([0.05, 0.2, 0.5])))
    note(f"{variant} dim={case.dim} alpha={case.alpha} std={case.std} seed={case.seed}: {case.layer.text}")
    return case


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def tolerance(reference: torch.Tensor) -> dict:
    scale = max(1.0, float(reference.abs().max()))
    return {"rtol": 1e-4, "atol": 1e-5 * scale}


# ----------------------------------------------------------------------------- the properties


@PROPERTY
@given(case=cases(), dtype=st.sampled_from(LOW), drop=st.sampled_from([{}, {"dropout": 0.5, "module_dropout": 0.3},
                                                                         {"rank_dropout": 0.5, "rank_dropout_scale": True}]))
def test_identity_at_init_is_exact(case, dtype, drop):
    if drop.get("rank_dropout") and case.algo == "sara":
        drop = {}  # SaRA has no rank to drop
    model, x, net = case.build(dtype, **drop)
    base = outputs(case.layer.make(dtype, case.seed)[0], x)
    for adapter in net:
        assert torch.equal(adapter.delta_weight(), torch.zeros_like(adapter.delta_weight()))
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        for train in (False, True):
            model.train(train)
            assert torch.equal(outputs(model, x), base), (mode, train)
            assert torch.equal(model(x), base), (mode, train, "with grad")


@PROPERTY
@given(case=cases(), dtype=st.sampled_from(LOW), multiplier=st.sampled_from([1.0, 0.5, -0.7, 2.0]))
def test_merged_forward_has_the_unmerged_rebuild_bits_and_bypass_agrees(case, dtype, multiplier):
    model, x, net = case.build(dtype, multiplier=multiplier)
    case.randomize(net)
    net.set_forward_mode("rebuild")
    unmerged = outputs(model, x)
    net.set_forward_mode("bypass")
    bypass = outputs(model, x)
    try:
        net.merge()
    except MergeError:
        assume(False)  # a merge that would overflow this dtype: the refusal is tested below
    merged = outputs(model, x)
    assert torch.equal(bits(merged), bits(unmerged))
    if dtype == torch.float32:
        torch.testing.assert_close(bypass, merged, **tolerance(merged))


@PROPERTY
@given(case=cases(), dtype=st.sampled_from(LOW), multipliers=st.lists(st.floats(-3, 3), min_size=1, max_size=5))
def test_unmerge_is_bit_exact_after_100_cycles(case, dtype, multipliers):
    model, x, net = case.build(dtype)
    case.randomize(net)
    original = {k: bits(v).clone() for k, v in model.state_dict().items()}
    base = outputs(model, x)
    changed = False
    for cycle in range(100):
        try:
            net.merge(multiplier=multipliers[cycle % len(multipliers)])
        except MergeError:
            pass
        else:
            changed |= any(not torch.equal(bits(v), original[k]) for k, v in model.state_dict().items())
            net.unmerge()
        assert all(torch.equal(bits(v), original[k]) for k, v in model.state_dict().items()), f"cycle {cycle}"
    assert torch.equal(bits(outputs(model, x)), bits(base))
    assert not net.merged and not any(a.merged for a in net)
    note(f"merges changed the weights: {changed}")


@PROPERTY
@given(case=cases(), dtype=st.sampled_from(LOW), save_dtype=st.sampled_from([None, None, torch.float16, torch.bfloat16]))
def test_save_then_load_is_bit_exact(case, dtype, save_dtype):
    model, x, net = case.build(dtype)
    case.randomize(net)
    if save_dtype is not None:  # a low-precision file holds the rounded parameters: start from them
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("scalar"):  # saved folded into a factor: a power of two keeps it exact
                    p.fill_(0.5)
                p.copy_(p.to(save_dtype).to(p.dtype))
    written = net.file_state_dict(dtype=save_dtype)
    expected = {}
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        expected[mode] = bits(outputs(model, x)).clone()
    with tempfile.TemporaryDirectory() as folder:
        path = net.save(Path(folder) / "a.safetensors", dtype=save_dtype)
        net.remove()
        loaded = load_network(model, path)
    assert [a.algo for a in loaded] == [case.algo]
    got = loaded.file_state_dict(dtype=save_dtype)
    assert sorted(got) == sorted(written)
    for key in written:
        assert got[key].dtype == written[key].dtype, key
        assert torch.equal(bits(got[key]) if got[key].is_floating_point() else got[key],
                           bits(written[key]) if written[key].is_floating_point() else written[key]), key
    for mode in ("rebuild", "bypass"):
        loaded.set_forward_mode(mode)
        assert torch.equal(bits(outputs(model, x)), expected[mode]), mode


@PROPERTY
@given(case=cases(), m=st.floats(-3, 3, allow_nan=False).filter(lambda m: abs(m) > 1e-3))
def test_multiplier_zero_is_the_base_and_linear_algorithms_scale_linearly(case, m):
    model, x, net = case.build(torch.float64)
    case.randomize(net)
    base_model, _ = case.layer.make(torch.float64, case.seed)
    base = outputs(base_model, x)
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        net.set_multiplier(1.0)
        one = outputs(model, x) - base
        net.set_multiplier(0.0)
        assert torch.equal(outputs(model, x), base), mode
        if case.algo not in NONLINEAR_MULTIPLIER:
            net.set_multiplier(m)
            torch.testing.assert_close(outputs(model, x) - base, m * one, rtol=1e-9, atol=1e-9 * max(1.0, float(one.abs().max())))


# ----------------------------------------------------------------------------- fp16 range


def delta_at(adapter, multiplier: float) -> torch.Tensor:
    """ΔW(m) in float64: m·ΔW for linear algorithms; SVDiff's own rule (m inside its ReLU) else."""
    with torch.no_grad():
        if adapter.algo in NONLINEAR_MULTIPLIER:
            zero = torch.zeros(adapter.host.weight.shape, dtype=torch.float64)
            return adapter.add_delta(zero, multiplier)
        return multiplier * adapter.delta_weight().double()


def reference_merge(adapter, multiplier: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W + m·ΔW (and b + m·Δb) in float64, for comparison with the fp32-computed merge."""
    host = adapter.host
    weight = host.weight.detach().double() + delta_at(adapter, multiplier)
    bias = None
    delta_b = adapter.delta_bias()
    if host.bias is not None and delta_b is not None:
        bias = host.bias.detach().double() + multiplier * delta_b.detach().double()
    return weight, bias


def _boundary(t: torch.Tensor) -> bool:
    """Values so close to fp16's overflow threshold (65520) that fp32 vs fp64 rounding decides."""
    return bool(((t.abs() > 65000) & (t.abs() < 66000)).any())


@PROPERTY
@given(case=cases(lambda name: name not in ("sara",)), multiplier=st.sampled_from([1.0, 0.5, -1.0, 3.0]),
       weight_scale=st.sampled_from([1.0, 1e3, 3e4, 6e4]), grow=st.integers(0, 12), cancel=st.booleans())
def test_fp16_merges_never_overflow_where_the_result_is_finite_and_refuse_where_it_is_not(
    case, multiplier, weight_scale, grow, cancel
):
    model, x, net = case.build(torch.float16)
    adapter = net.adapters["0"]
    host = adapter.host
    case.randomize(net)
    with torch.no_grad():
        for _ in range(grow):  # larger adapters: ΔW grows past fp16's range
            for p in net.parameters():
                p.mul_(2.0)
        w = host.weight.double()
        w = w / max(float(w.abs().max()), 1e-3) * weight_scale
        if cancel:  # a weight that cancels most of ΔW, so W + ΔW is finite although ΔW is not in fp16
            host.weight.copy_(w.to(torch.float16))
            delta = delta_at(adapter, multiplier)
            w = (-0.7 * delta).clamp(-65000, 65000)
        host.weight.copy_(w.to(torch.float16))
    weight, bias = reference_merge(adapter, multiplier)
    assume(not _boundary(weight) and (bias is None or not _boundary(bias)))
    finite = bool(torch.isfinite(weight.to(torch.float16)).all()) and (bias is None or bool(torch.isfinite(bias.to(torch.float16)).all()))
    note(f"finite result: {finite}; ΔW beyond fp16: {bool((adapter.delta_weight().abs() > 65504).any())}")
    before = {k: bits(v).clone() for k, v in model.state_dict().items()}
    if finite:
        net.merge(multiplier=multiplier)
        torch.testing.assert_close(host.weight.double(), weight.to(torch.float16).double(), rtol=2**-10, atol=2**-24)
        if bias is not None:
            torch.testing.assert_close(host.bias.double(), bias.to(torch.float16).double(), rtol=2**-10, atol=2**-24)
        net.unmerge()
    else:
        with pytest.raises(MergeError, match="NaN/Inf"):
            net.merge(multiplier=multiplier)
        assert not net.merged
    assert all(torch.equal(bits(v), before[k]) for k, v in model.state_dict().items())


def _overflowing_but_finite(net, host_weight_scale: float = 3e4) -> bool:
    """Make one adapter's ΔW exceed fp16's range while W + ΔW stays finite; False if this
    algorithm has no such state here."""
    adapter = net.adapters["0"]
    host = adapter.host
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        randomize(net, std=0.3, seed=1)
        if getattr(adapter, "dora_scale", None) is not None:
            # DoRA: W' = m·(W + ΔV)/‖W + ΔV‖. A negative magnitude m = −½‖W‖ gives W' ≈ −½W, ΔW ≈ −1.5W.
            host.weight.copy_((torch.rand(host.weight.shape, generator=g) * 2e4 + 4e4).to(host.weight.dtype))
            for name, p in net.named_parameters():
                if "dora_scale" not in name:
                    p.mul_(1e-3)
            from lycoris_like.kernels.dora import weight_norm

            adapter.dora_scale.copy_(-0.5 * weight_norm(host.weight.float(), adapter.wd_on_out))
        elif adapter.algo == "ia3":
            # (IA)³: W' = W ⊙ (1 + l). l = −1.5 gives ΔW = −1.5W, W' = −½W.
            host.weight.copy_((torch.rand(host.weight.shape, generator=g) * 2e4 + 4e4).to(host.weight.dtype))
            adapter.weight.fill_(-1.5)
            if host.bias is not None:
                host.bias.zero_()
        elif adapter.algo in ("lora", "loha", "lokr", "full"):
            # ΔW does not depend on W: grow ΔW just past 65504, then W = −½ΔW (so W + ΔW = ½ΔW).
            for _ in range(500):
                if float(adapter.delta_weight().abs().max()) > 7e4:
                    break
                for p in net.parameters():
                    p.mul_(1.1)
            delta = adapter.delta_weight().double()
            host.weight.copy_((-0.5 * delta).to(host.weight.dtype))
            if host.bias is not None:
                host.bias.zero_()
                if adapter.delta_bias() is not None:
                    adapter.delta_bias().clamp_(-1, 1)
        else:
            return False
    return True


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fp16_merge_of_a_delta_beyond_fp16_range_onto_a_finite_weight(variant):
    algo, options = VARIANTS[variant]
    model = nn.Sequential(nn.Linear(8, 6)).half()
    net = create_network(model, algo=algo, dim=2, alpha=1, **with_sparse_threshold(algo, options))
    if not _overflowing_but_finite(net):
        pytest.skip(f"{algo}: no construction of a ΔW beyond fp16 range with a finite W' here")
    adapter = net.adapters["0"]
    delta = adapter.delta_weight()
    assert bool((delta.abs() > 65504).any()), "ΔW is within fp16's range: the test proves nothing"
    assert not bool(torch.isfinite(delta.half()).all())  # computed in fp16, ΔW alone would be Inf
    weight, bias = reference_merge(adapter, 1.0)
    assert bool(torch.isfinite(weight.half()).all())
    original = bits(model[0].weight).clone()
    net.merge()
    assert bool(torch.isfinite(model[0].weight).all())
    torch.testing.assert_close(model[0].weight.double(), weight.half().double(), rtol=2**-10, atol=2**-24)
    net.unmerge()
    assert torch.equal(bits(model[0].weight), original)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_merge_that_would_create_nan_or_inf_refuses_and_leaves_every_layer_unchanged(variant, dtype):
    """Three layers; only the last one's merge would overflow. The first two were written in place
    and are put back: every tensor ends with its original bits and no merge-stack entry."""
    algo, options = VARIANTS[variant]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Conv1d(12, 6, 3, padding=1), nn.Linear(5, 4)).to(dtype)
    x = torch.randn(2, 12, 5).to(dtype)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model[2](model[1](x))

    base = bits(forward()).clone()
    net = create_network(model, algo=algo, dim=2, alpha=1, **with_sparse_threshold(algo, options))
    randomize(net, std=0.3, seed=3)
    last = net.adapters["2"]
    with torch.no_grad():
        for _ in range(400):  # grow the last adapter until its merge would not be finite
            weight, bias = reference_merge(last, 1.0)
            if not bool(torch.isfinite(weight.to(dtype)).all()) or (bias is not None and not bool(torch.isfinite(bias.to(dtype)).all())):
                break
            for p in last.parameters():
                if p.numel() and bool((p != 0).any()):
                    p.mul_(4.0)
                else:
                    p.fill_(1.0)
        else:
            pytest.fail("could not make the merge overflow")
    before = {k: bits(v).clone() for k, v in model.state_dict().items()}
    out = bits(forward()).clone()
    with pytest.raises(MergeError, match=r"NaN/Inf in 2; no weight was changed"):  # only layer 2 named
        net.merge()
    assert not net.merged and not any(a.merged for a in net)
    assert all(torch.equal(bits(v), before[k]) for k, v in model.state_dict().items())
    assert not any("_lycoris_like_merges" in p.__dict__ for p in model.parameters())
    assert torch.equal(bits(forward()), out)
    net.remove()
    assert torch.equal(bits(forward()), base)


@pytest.mark.parametrize("bad_layer", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_a_failed_merge_over_a_merged_network_keeps_that_network_unmergeable(dtype, bad_layer):
    """Network A is merged; B's merge writes in place, meets a NaN in `bad_layer`, puts everything
    back and checks the rest without writing. A's record of the weights still matches, so A
    unmerges, and every weight ends with its pre-A bits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 6), nn.Linear(6, 4)).to(dtype)
    original = {k: bits(v).clone() for k, v in model.state_dict().items()}
    first = create_network(model, algo="lora", dim=2, alpha=1)
    randomize(first, std=0.3, seed=1)
    first.merge()
    merged = {k: bits(v).clone() for k, v in model.state_dict().items()}
    second = create_network(model, algo="loha", dim=2, alpha=1, stack=True)
    randomize(second, std=0.3, seed=2)
    with torch.no_grad():
        second.adapters[bad_layer].hada_w1_a[0, 0] = float("nan")
        second.adapters["2"].hada_w1_a[0, 0] = float("inf")
    with pytest.raises(MergeError, match=rf"NaN/Inf in {bad_layer}, 2; no weight was changed"):
        second.merge()
    assert not second.merged
    assert all(torch.equal(bits(v), merged[k]) for k, v in model.state_dict().items())
    first.unmerge()
    assert all(torch.equal(bits(v), original[k]) for k, v in model.state_dict().items())
    assert not any("_lycoris_like_merges" in p.__dict__ for p in model.parameters())


def test_an_embedding_host_without_bias_merges_and_runs():
    pytest.importorskip("lycoris_like.modules.svdiff")
    model = nn.Sequential(nn.Embedding(6, 4))
    x = torch.tensor([[1, 2, 5]])
    base = outputs(model, x)
    net = create_network(model, algo="svdiff")
    randomize(net, std=0.3, seed=1)
    net.set_forward_mode("rebuild")
    unmerged = outputs(model, x)
    assert not torch.equal(unmerged, base)
    net.merge()
    assert torch.equal(bits(outputs(model, x)), bits(unmerged))
    net.unmerge()
    net.remove()
    assert torch.equal(outputs(model, x), base)


def test_a_sara_network_saved_in_half_precision_loads_again(tmp_path):
    pytest.importorskip("lycoris_like.modules.sara")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    net = create_network(model, algo="sara", threshold=0.2)
    randomize(net, std=0.05, seed=1)
    path = net.save(tmp_path / "half.safetensors", dtype=torch.float16)
    net.remove()
    assert len(load_network(model, path)) == 1
