"""`dtype=`: the adapter parameters' dtype on `create_network` and `load_network`. The default is
float32 on a half-precision host (float64 on a float64 one) — what trainers expect; bfloat16
parameters halve the adapter's memory and its casts. Every guarantee holds in either."""

from __future__ import annotations

import pytest
import torch

from lycoris_like import ConfigError, create_network, load_network

from conftest import VARIANTS, bits, make_host, randomize

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# SaRA trains the base's own entries (P₀[M] at the base's precision); SVDiff keeps float32 SVD buffers.
DTYPE_VARIANTS = sorted(v for v, (algo, _) in VARIANTS.items() if algo not in ("sara", "svdiff"))


@pytest.mark.parametrize("host_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_the_default_is_float32_or_the_hosts_wider_dtype(host_dtype):
    model, _ = make_host("conv2d-k3", host_dtype)
    net = create_network(model, algo="lora", dim=2)
    expected = torch.float64 if host_dtype == torch.float64 else torch.float32
    assert {p.dtype for p in net.parameters()} == {expected}


@pytest.mark.parametrize("variant", DTYPE_VARIANTS)
@pytest.mark.parametrize("host_name", ["linear", "conv2d-k3"])
def test_half_precision_parameters_keep_identity_merge_and_unmerge_exact(variant, host_name):
    algo, options = VARIANTS[variant]
    model, x = make_host(host_name, torch.bfloat16)
    base = model(x)
    net = create_network(model, algo=algo, dim=3, alpha=2, dtype=torch.bfloat16, **options)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    for mode in ("auto", "rebuild", "bypass"):
        net.set_forward_mode(mode)
        assert torch.equal(model(x), base), mode  # identity at init, bf16 parameters included (DoRA's magnitude)
    randomize(net, std=0.1, seed=7)
    net.set_forward_mode("rebuild")
    with torch.no_grad():
        unmerged = model(x)
        before = {k: bits(v).clone() for k, v in model.state_dict().items()}
        net.merge()
        assert torch.equal(bits(model(x)), bits(unmerged))
        net.unmerge()
    assert all(torch.equal(bits(v), before[k]) for k, v in model.state_dict().items())
    # A training step reaches the bf16 parameters, under autocast too.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in net.parameters() if p.requires_grad)


def test_load_network_takes_the_dtype_and_the_file_keeps_its_bytes(tmp_path):
    model, x = make_host("linear", torch.float32)
    net = create_network(model, algo="loha", dim=4, alpha=2)
    randomize(net, std=0.2, seed=1)
    path = net.save(tmp_path / "a.safetensors")
    expected = model(x)
    net.remove()
    for name, dtype in HALF.items():
        loaded = load_network(model, path, dtype=dtype)
        assert {p.dtype for p in loaded.parameters()} == {dtype}
        torch.testing.assert_close(model(x), expected, rtol=2e-2, atol=2e-2)
        loaded.remove()
    loaded = load_network(model, path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("bad", [torch.int32, "bfloat16", torch.bool])
def test_a_bad_dtype_is_a_config_error(bad):
    model, _ = make_host("linear")
    with pytest.raises(ConfigError, match="dtype"):
        create_network(model, algo="lora", dtype=bad)
    assert "forward" not in model[0].__dict__  # nothing attached
