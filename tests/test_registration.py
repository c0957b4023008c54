"""`register(network, model)`: the adapters as submodules of the model, for the idioms diffusers and
accelerate scripts use (`unet.parameters()`, `unet.state_dict()`, DDP around the UNet alone),
and `unregister`, which restores the model's own parameters and keys exactly."""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lycoris_like import ConfigError, create_network, register, unregister

from conftest import bits, make_clip, make_unet, randomize, unet_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def trainable(model) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def frozen_unet_with_network(**options):
    unet = make_unet().requires_grad_(False)
    keys = list(unet.state_dict())
    net = create_network(unet, algo="lora", dim=2, alpha=1, preset="attn-mlp", **options)
    return unet, keys, net


def test_by_default_the_host_has_no_adapter_parameters_or_keys():
    unet, keys, net = frozen_unet_with_network()
    assert list(unet.state_dict()) == keys
    assert not trainable(unet) and len(list(net.parameters())) > 0


def test_registered_adapters_are_the_models_trainable_parameters_and_state():
    unet, keys, net = frozen_unet_with_network()
    register(net, unet)
    assert trainable(unet) == {id(p) for p in net.parameters()}
    state = unet.state_dict()
    adapter_keys = {"lycoris_like." + k for k in net.state_dict()}
    assert set(state) == set(keys) | adapter_keys and len(state) == len(keys) + len(adapter_keys)
    for key, value in net.state_dict().items():
        assert state["lycoris_like." + key] is value or torch.equal(state["lycoris_like." + key], value)


def test_model_load_state_dict_restores_the_adapters():
    unet, _, net = frozen_unet_with_network()
    register(net, unet)
    randomize(net, seed=1)
    with torch.no_grad():
        expected = unet(*unet_inputs()).sample
    saved = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    unet.load_state_dict(saved)
    for key, value in net.state_dict().items():
        assert torch.equal(bits(value), bits(saved["lycoris_like." + key]))
    with torch.no_grad():
        assert torch.equal(unet(*unet_inputs()).sample, expected)


def test_registration_makes_no_module_cycle():
    unet, _, net = frozen_unet_with_network()
    register(net, unet)
    visited: list[int] = []
    unet.apply(lambda m: visited.append(id(m)))  # recurses through children(): a cycle would not end
    assert len(visited) == len(set(visited)) == len(list(unet.modules()))
    assert unet not in list(net.modules())
    unet.to(torch.float64).to(torch.float32)  # _apply walks children() too


def test_a_pipeline_network_registers_on_each_model_only_its_own_adapters():
    unet, te = make_unet().requires_grad_(False), make_clip().requires_grad_(False)
    net = create_network({"lora_unet": unet, "lora_te": te}, dim=2, preset="attn-mlp")
    register(net, unet)
    register(net, te)
    unet_hosts, te_hosts = {id(m) for m in unet.modules()}, {id(m) for m in te.modules()}
    for model, hosts in ((unet, unet_hosts), (te, te_hosts)):
        expected = {id(p) for a in net if id(a.host.module) in hosts for p in a.parameters()}
        assert trainable(model) == expected and expected
    assert {k.split(".")[1].split("_")[1] for k in unet.state_dict() if k.startswith("lycoris_like.")} == {"unet"}
    assert {k.split(".")[1].split("_")[1] for k in te.state_dict() if k.startswith("lycoris_like.")} == {"te"}


def test_unregister_restores_the_models_own_parameters_and_keys():
    unet, keys, net = frozen_unet_with_network()
    randomize(net, seed=2)
    with torch.no_grad():
        adapted = unet(*unet_inputs()).sample
    register(net, unet)
    assert unregister(net) == 1
    assert list(unet.state_dict()) == keys and not trainable(unet)
    assert unregister(net) == 0
    with torch.no_grad():
        assert torch.equal(unet(*unet_inputs()).sample, adapted)  # the network stays attached
    register(net, unet)  # and can be registered again
    net.remove()
    assert unregister(net, unet) == 1 and list(unet.state_dict()) == keys


def test_register_refuses_bad_input():
    unet, _, net = frozen_unet_with_network()
    register(net, unet)
    with pytest.raises(ConfigError, match="already has"):
        register(net, unet)
    with pytest.raises(ConfigError, match="no adapter"):
        register(net, make_clip())
    with pytest.raises(ConfigError, match="AdapterNetwork"):
        register(unet, unet)


# ----------------------------------------------------------------------------- DDP around the UNet alone

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _registered_unet():
    unet, _, net = frozen_unet_with_network()
    randomize(net, std=0.05, seed=3)  # non-zero up weights: every adapter parameter gets a gradient
    register(net, unet)
    return unet, net


def _grads(unet, net, rank: int, wrap) -> dict[str, torch.Tensor]:
    latents, timesteps, context = unet_inputs(batch=2, seed=10 + rank)  # different data per rank
    F.mse_loss(wrap(latents, timesteps, context).sample, torch.zeros_like(latents)).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        unet, net = _registered_unet()
        ddp = DistributedDataParallel(unet)  # the UNet alone: the network is not wrapped
        result = {"grads": _grads(unet, net, rank, ddp), "reduced": sum(p.numel() for p in ddp.parameters() if p.requires_grad)}
    except Exception:  # noqa: BLE001 — reported by the parent
        result = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def test_ddp_around_the_unet_alone_all_reduces_the_registered_adapter_gradients(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert not [r["error"] for r in ranks if "error" in r], ranks
    # the reference: each rank's local gradient computed in this process, then averaged
    local = []
    for rank in range(WORLD):
        unet, net = _registered_unet()
        local.append(_grads(unet, net, rank, unet))
    assert ranks[0]["reduced"] == sum(g.numel() for g in local[0].values())
    for name in local[0]:
        assert not torch.allclose(local[0][name], local[1][name])  # the data differ, so do local gradients
        mean = (local[0][name] + local[1][name]) / WORLD
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], mean, rtol=1e-5, atol=1e-7)
