"""`torch.compile` of adapted diffusers UNet blocks (issue 7).

For each algorithm, a `ResnetBlock2D` (Conv2d k=3, a 1×1 shortcut conv, the time-embedding Linear)
adapted and compiled with `fullgraph=True` (no graph breaks) matches eager in forward and in every
adapter gradient; changing the multiplier afterwards never recompiles (the multiplier is a tensor
buffer), counted by a compile counter and enforced with `error_on_recompile`. A
`BasicTransformerBlock` (attention + feed-forward Linears) carrying several algorithms at once
checks the attention path the same way.

`backend="aot_eager"` traces forward and backward through AOTAutograd like inductor does, without
inductor's C++ compile time.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from lycoris_like import create_network

from conftest import randomize
from test_hostile_files import all_variants
from test_properties import with_sparse_threshold

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = all_variants()
# One variant per code path: low-rank (bypass), Tucker, Hadamard (custom autograd Function),
# Kronecker, DoRA (weight-dependent, detached norm), (IA)³ (output rescale), full, and the new ones.
COMPILED = [v for v in ("lora", "lora-tucker", "lora-dora", "loha", "lokr", "ia3", "full", "sara", "svdiff")
            if v in VARIANTS]
MULTIPLIERS = (0.25, -1.5, 0.0, 2.0)


def _resnet_block():
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=8, out_channels=12, temb_channels=16, groups=4).eval()
    g = torch.Generator().manual_seed(1)
    return block.requires_grad_(False), (torch.randn(2, 8, 6, 6, generator=g), torch.randn(2, 16, generator=g)), {}


def _attention_block():
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(16, 2, 8, cross_attention_dim=12).eval()
    g = torch.Generator().manual_seed(1)
    return (block.requires_grad_(False), (torch.randn(2, 6, 16, generator=g),),
            {"encoder_hidden_states": torch.randn(2, 5, 12, generator=g)})


def _loss(out) -> torch.Tensor:
    out = out[0] if isinstance(out, tuple) else out
    return out.square().mean()


def _check_compiled_matches_eager(block, net, args, kwargs) -> None:
    torch._dynamo.reset()
    eager = block(*args, **kwargs)
    net.zero_grad()
    _loss(eager).backward()
    eager_grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    assert all(bool(g.abs().max() > 0) for g in eager_grads.values())
    net.zero_grad()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    out = compiled(*args, **kwargs)
    _loss(out).backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-7, msg=lambda m: f"{n}: {m}")
    frames = counter.frame_count
    assert frames >= 1

    with torch._dynamo.config.patch(error_on_recompile=True):
        for m in MULTIPLIERS:
            net.set_multiplier(m)
            net.zero_grad()
            out = compiled(*args, **kwargs)
            _loss(out).backward()
            got = {n: p.grad.clone() for n, p in net.named_parameters()}
            net.zero_grad()
            expected = block(*args, **kwargs)
            _loss(expected).backward()
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
            for n, p in net.named_parameters():
                torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=lambda msg: f"m={m} {n}: {msg}")
    assert counter.frame_count == frames  # no recompile for any multiplier


@pytest.mark.parametrize("variant", COMPILED)
def test_compiled_resnet_block_matches_eager_and_the_multiplier_never_recompiles(variant):
    algo, options = VARIANTS[variant]
    block, args, kwargs = _resnet_block()
    net = create_network(block, algo=algo, dim=2, alpha=1, **with_sparse_threshold(algo, options))
    randomize(net, std=0.1, seed=2)
    assert len(net) >= 4  # conv1, conv2, conv_shortcut, time_emb_proj (and the norms, for SVDiff)
    _check_compiled_matches_eager(block, net, args, kwargs)


def test_compiled_attention_block_with_several_algorithms_matches_eager():
    block, args, kwargs = _attention_block()
    overrides = {"attn1.to_k": {"algo": "loha"}, "attn2.to_q": {"algo": "lokr", "factor": 4},
                 "attn2.to_out": {"algo": "ia3"}, "ff": {"algo": "lora", "weight_decompose": True}}
    net = create_network(block, algo="lora", dim=2, alpha=1, preset="full", overrides=overrides)
    randomize(net, std=0.1, seed=3)
    assert {a.algo for a in net} == {"lora", "loha", "lokr", "ia3"}
    _check_compiled_matches_eager(block, net, args, kwargs)
