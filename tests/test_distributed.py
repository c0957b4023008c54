"""Scale-out with PyTorch's own engine: DistributedDataParallel over gloo, 2 CPU processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from safetensors import safe_open
from torch.nn.parallel import DistributedDataParallel

from lycoris_like import create_network

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_and_batch(algo: str, options: dict):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 10, 3, padding=1), nn.SiLU(), nn.Conv2d(10, 6, 1), nn.Flatten(), nn.Linear(6 * 25, 12))
    model.requires_grad_(False)
    net = create_network(model, algo=algo, dim=2, alpha=1, **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    batch = torch.randn(8, 6, 5, 5, generator=g)
    return model, net, batch


def _worker(rank: int, port: int, algo: str, options: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, net, batch = _model_and_batch(algo, options)
        ddp = DistributedDataParallel(net)
        shard = batch.chunk(WORLD)[rank]
        loss = ddp(shard).square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        communicated = sum(p.numel() for p in ddp.module.parameters() if p.requires_grad)
        torch.save({"grads": grads, "communicated": communicated}, os.path.join(out_dir, f"rank{rank}.pt"))
        torch.optim.SGD(net.parameters(), lr=0.1).step()
        os.makedirs(os.path.join(out_dir, f"rank{rank}"))
        net.save(os.path.join(out_dir, f"rank{rank}", "adapter.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("algo, options", [("lora", {"use_tucker": True})], ids=["lora-tucker"])
def test_ddp_gradients_equal_single_process_and_only_adapters_are_communicated(tmp_path, algo, options):
    mp.spawn(_worker, args=(_free_port(), algo, options, str(tmp_path)), nprocs=WORLD, join=True)
    model, net, batch = _model_and_batch(algo, options)
    model(batch).square().mean().backward()
    expected = {n: p.grad for n, p in net.named_parameters()}
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    adapter_params = sum(p.numel() for p in net.parameters())
    frozen = sum(p.numel() for p in model.parameters())
    for result in results:
        assert result["communicated"] == adapter_params and frozen > adapter_params
        assert result["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7)
    files = [tmp_path / f"rank{r}" / "adapter.safetensors" for r in range(WORLD)]
    data = [f.read_bytes() for f in files]
    header = [int.from_bytes(d[:8], "little") for d in data]
    assert data[0][8 + header[0]:] == data[1][8 + header[1]:]  # identical tensors, byte for byte
    with safe_open(str(files[0]), "pt") as a, safe_open(str(files[1]), "pt") as b:
        assert a.metadata()["sshs_model_hash"] == b.metadata()["sshs_model_hash"]
