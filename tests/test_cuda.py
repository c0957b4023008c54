"""The exactness guarantees on a GPU (the `cuda` marker; skipped without one): identity at init,
merged ≡ unmerged rebuild bit for bit, bit-exact unmerge in fp32/bf16/fp16, fast path ≈ rebuild,
and the kernels per adapted layer as a regression number — on CUDA tensors, where the kernels
and the cost model's choices differ from the CPU's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lycoris_like import create_network

from conftest import HOSTS, VARIANTS, bits, make_host, randomize

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_HOSTS = ["linear", "conv2d-k3", "conv2d-k1", "conv1d-k3", "conv2d-groups2", "conv2d-reflect"]
assert set(GPU_HOSTS) <= set(HOSTS)


def on_gpu(host_name: str, variant: str, dtype: torch.dtype = torch.float32, **kwargs):
    algo, options = VARIANTS[variant]
    model, x = make_host(host_name, dtype)
    model, x = model.cuda(), x.cuda()
    base = model(x)
    net = create_network(model, algo=algo, dim=3, alpha=2, **{**options, **kwargs})
    return model, x, base, net


@pytest.mark.parametrize("host_name", GPU_HOSTS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_identity_merge_and_bit_exact_unmerge_on_the_gpu(host_name, variant, dtype):
    try:
        model, x, base, net = on_gpu(host_name, variant, dtype)
    except Exception as exc:  # an algorithm that does not adapt this layer kind
        pytest.skip(str(exc))
    for mode in ("auto", "rebuild", "bypass"):
        net.set_forward_mode(mode)
        assert torch.equal(model(x), base), mode  # identity at init
    randomize(net, std=0.05, seed=3)
    net.set_forward_mode("rebuild")
    net.set_multiplier(0.6)
    with torch.no_grad():
        unmerged = model(x)
    original = {k: bits(v).clone() for k, v in model.state_dict().items()}
    for _ in range(5):
        net.merge()
        with torch.no_grad():
            assert torch.equal(bits(model(x)), bits(unmerged))  # merged ≡ unmerged rebuild
        net.unmerge()
    assert all(torch.equal(bits(v), original[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("host_name", GPU_HOSTS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_paths_match_the_rebuild_on_the_gpu(host_name, variant):
    try:
        model, x, base, net = on_gpu(host_name, variant)
    except Exception as exc:
        pytest.skip(str(exc))
    randomize(net, std=0.05, seed=4)
    model.requires_grad_(False)
    outs = {}
    for mode in ("rebuild", "bypass"):
        net.set_forward_mode(mode)
        net.zero_grad()
        xx = x.clone().requires_grad_(True)
        y = model(xx)
        y.square().sum().backward()
        outs[mode] = (y.detach(), xx.grad, [p.grad.clone() for p in net.parameters()])
    (y0, gx0, gp0), (y1, gx1, gp1) = outs["rebuild"], outs["bypass"]
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-5)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "ia3", "dora"])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_kernels_per_layer_on_the_gpu_are_no_more_than_peft(algo, layer, monkeypatch):
    """benchmarks/ops.py's count on CUDA tensors (bf16 host under autocast, bf16 adapters on both sides)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import ops

    real_host = ops.host
    monkeypatch.setattr(ops, "host", lambda kind, dtype: tuple(t.cuda() for t in real_host(kind, dtype)))
    monkeypatch.setattr(ops, "setting", lambda autocast: torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast))
    bare = sum(ops.count(None, "", layer, torch.bfloat16, True, True).values())
    ours = sum(ops.count("ours", algo, layer, torch.bfloat16, True, True, torch.bfloat16).values()) - bare
    peft = sum(ops.count("peft", algo, layer, torch.bfloat16, True, True).values()) - bare
    print(f"{algo} {layer}: ours {ours}, peft {peft}")
    assert ours <= peft + (3 if (algo, layer) == ("dora", "conv") else 0)
