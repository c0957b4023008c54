"""Extending is one file: docs/examples/vera.py (≤ 60 lines, no edit anywhere else) registers VeRA,
and the whole library works on it — create, a training step, save, load, merge/unmerge, the
planner's choice of its bypass, and the tools (inspect, combine, bake) — checked against the
naive VeRA formula written here."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lycoris_like import create_network, load_network
from lycoris_like.tools import bake, combine, inspect_file

from conftest import bits, fast, make_host, reference_op

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "vera.py"


def load_example():
    if "vera_example" not in sys.modules:
        spec = importlib.util.spec_from_file_location("vera_example", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["vera_example"] = module
        spec.loader.exec_module(module)
    return sys.modules["vera_example"]


def naive_vera(adapter) -> torch.Tensor:
    """ΔW = diag(b)·B·diag(d)·A, entry by entry in float64."""
    a, b_mat = adapter.vera_A.double(), adapter.vera_B.double()
    d, b = adapter.vera_d.detach().double(), adapter.vera_b.detach().double()
    out, rank = b_mat.shape
    delta = torch.zeros(out, a.shape[1], dtype=torch.float64)
    for k in range(rank):
        delta += b[:, None] * b_mat[:, k:k + 1] * d[k] * a[k:k + 1, :]
    return delta.reshape(adapter.host.weight.shape)


def test_the_example_is_one_small_file():
    source = EXAMPLE.read_text()
    assert len(source.splitlines()) <= 60
    assert "register_algorithm(\"vera\")" in source


@pytest.mark.parametrize("host_name", ["linear", "conv2d-k3", "conv1d-k1", "conv2d-stride2", "conv2d-reflect"])
def test_create_train_save_load_merge(tmp_path, host_name):
    load_example()
    model, x = make_host(host_name, torch.float64)
    model.requires_grad_(False)
    base = model(x)
    net = create_network(model, algo="vera", dim=6, d_init=0.3)
    assert torch.equal(model(x), base)  # b = 0: the identity, exactly
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    model(x).square().mean().backward()
    optimizer.step()
    adapter = net.adapters["0"]
    assert adapter.vera_b.abs().max() > 0 and not any(p.grad is not None for p in model.parameters())
    expected = reference_op(model[0], x, model[0].weight + naive_vera(adapter))
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    net.set_forward_mode("rebuild")
    unmerged = model(x)
    before = bits(model[0].weight).clone()
    net.merge()
    assert torch.equal(bits(model(x)), bits(unmerged))
    net.unmerge()
    assert torch.equal(bits(model[0].weight), before)
    path = net.save(tmp_path / "vera.safetensors")
    net.remove()
    fresh, _ = make_host(host_name, torch.float64)
    loaded = load_network(fresh, path)
    assert type(loaded.adapters["0"]).__name__ == "VeRA"
    torch.testing.assert_close(fresh(x), expected, rtol=1e-10, atol=1e-10)


def test_the_bypass_is_chosen_when_cheaper_with_or_without_a_hand_written_cost():
    """No cost methods: the defaults count the entries of its factors (the frozen A and B too)."""
    vera = load_example().VeRA
    model, _ = make_host("linear")  # 48 → 80
    model.requires_grad_(False)
    net = create_network(model, algo="vera", dim=4)
    adapter = net.adapters["0"]
    assert fast(adapter, torch.randn(4096, 48))  # training: the rebuild would form ∇W too
    with torch.no_grad():
        assert fast(adapter, torch.randn(2, 48))  # a few positions: the bypass
        assert not fast(adapter, torch.randn(4096, 48))  # many: building ΔW once is cheaper
    net.remove()

    class Expensive(vera):
        def bypass_flops(self, tokens: int) -> int:  # a hand-written cost that says: never
            return 10**12

    from lycoris_like.hosts import HostLayer

    assert not fast(Expensive(HostLayer.of(model[0]), 4), torch.randn(2, 48))


def test_the_tools_work_on_it(tmp_path):
    load_example()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Conv2d(6, 10, 3, padding=1))
    model.requires_grad_(False)
    base_path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base_path))
    net = create_network(model, algo="vera", dim=3)
    with torch.no_grad():
        for adapter in net:
            adapter.vera_b.normal_(0, 0.2)
    path = net.save(tmp_path / "vera.safetensors")
    deltas = {p: naive_vera(a) for p, a in net.adapters.items()}

    report = inspect_file(path, base=base_path)
    assert {m.algo for m in report.modules} == {"vera"}
    for m in report.modules:
        layer = m.name.removeprefix("lycoris_")
        assert math.isclose(m.delta_norm, float(deltas[layer].norm()), rel_tol=1e-6)

    dense = combine([(path, 0.5)], to="diff", base=base_path)
    for layer, delta in deltas.items():
        torch.testing.assert_close(dense.tensors[f"lycoris_{layer}.diff"].double(), 0.5 * delta, rtol=1e-6, atol=1e-7)

    out = tmp_path / "baked.safetensors"
    bake(base_path, [(path, 1.0)], out)
    from safetensors.torch import load_file

    baked = load_file(str(out))
    for layer, delta in deltas.items():
        torch.testing.assert_close(baked[f"{layer}.weight"].double(), model.get_submodule(layer).weight.double() + delta,
                                   rtol=1e-6, atol=1e-7)
