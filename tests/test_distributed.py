"""Scale-out with PyTorch's own engines, on CPU: gloo, 2 processes started by the test.

One `torch.multiprocessing` spawn (module fixture) runs, for every algorithm and option variant:

- `DistributedDataParallel(network)` — `AdapterNetwork.forward` runs the model, so DDP sees only the
  adapters: two SGD steps on two halves of a global batch. A comm hook records exactly which
  tensors are all-reduced. Each rank saves the network after the steps.
- `torch.distributed.fsdp.fully_shard(network)`, alone and with the host layers sharded too: the
  same two steps; gradients and parameters are gathered (`full_tensor()`), and the network is
  saved from rank 0 after `unshard()`.

The parent then compares with one process training on the whole global batch: equal gradients at
every step (to float tolerance: the reduction order differs), only adapter parameters
communicated, the host model untouched, and the same file from rank 0 (bit-identical on both DDP
ranks). See docs/distributed.md.
"""

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
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lycoris_like import create_network

from test_hostile_files import all_variants
from test_properties import with_sparse_threshold

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
STEPS = 2
LR = 0.1
VARIANTS = all_variants()
FSDP_MODES = ("adapters", "adapters+host")
# Sharding the host layers as well: one variant per algorithm (and DoRA), to bound the run time.
HOST_SHARDED = {"lora", "lora-tucker", "lora-dora", "loha", "lokr", "ia3", "full", "sara", "svdiff"}


def _modes(name: str) -> tuple[str, ...]:
    return FSDP_MODES if name in HOST_SHARDED else FSDP_MODES[:1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_and_batches(algo: str, options: dict):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 10, 3, padding=1), nn.SiLU(), nn.Conv2d(10, 6, 1), nn.Flatten(), nn.Linear(6 * 25, 12))
    model.requires_grad_(False)
    net = create_network(model, algo=algo, dim=2, alpha=1, **with_sparse_threshold(algo, options))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    batches = [torch.randn(8, 6, 5, 5, generator=g) for _ in range(STEPS)]  # the global batch of each step
    return model, net, batches


def _host_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_run(rank: int, name: str, out_dir: Path) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    algo, options = VARIANTS[name]
    model, net, batches = _model_and_batches(algo, options)
    host_before = _host_state(model)
    # SVDiff's and SaRA's buffers are computed from the (identical) base on every rank: no need to
    # broadcast them each step (docs/distributed.md); the other variants keep DDP's default.
    ddp = DistributedDataParallel(net, broadcast_buffers=algo not in ("svdiff", "sara"))
    names = {id(p): n for n, p in net.named_parameters()}
    host_ids = {id(t) for t in [*model.parameters(), *model.buffers()]}
    communicated: list[list[str]] = []

    def recording_hook(state, bucket):
        communicated.append(sorted(names.get(id(p), "<not an adapter parameter>") for p in bucket.parameters()))
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(dist.group.WORLD, recording_hook)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    grads = []
    for batch in batches:
        opt.zero_grad()
        ddp(batch.chunk(WORLD)[rank]).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
        opt.step()
    path = out_dir / f"ddp-{name}-rank{rank}.safetensors"
    net.save(path)
    wrapped = {id(t) for t in [*ddp.module.parameters(), *ddp.module.buffers()]}
    return {
        "grads": grads,
        "communicated": communicated,
        "wrapped_host_tensors": len(wrapped & host_ids),
        "host_unchanged": all(torch.equal(v, host_before[k]) for k, v in model.state_dict().items()),
        "host_grads": sum(p.grad is not None for p in model.parameters()),
    }


def _ddp_module_dropout_run(rank: int, out_dir: Path) -> dict:
    """module_dropout skips whole adapters at random, so some parameters get no gradient in a step:
    DDP needs `find_unused_parameters=True`. Both ranks must still end with identical adapters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.SiLU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 4)).requires_grad_(False)
    net = create_network(model, algo="lora", dim=2, alpha=1, module_dropout=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    ddp = DistributedDataParallel(net, find_unused_parameters=True)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    torch.manual_seed(10 + rank)  # each rank draws its own dropouts
    skipped = 0
    for step in range(6):
        opt.zero_grad()
        net.train()
        model.train()
        ddp(torch.randn(4, 6)).square().mean().backward()
        skipped += sum(p.grad is None for p in net.parameters())
        opt.step()
    net.save(out_dir / f"ddp-module-dropout-rank{rank}.safetensors")
    return {"skipped": skipped}


class _Pipeline(nn.Module):
    """docs/distributed.md's wrapper for a pipeline network: registers the network (the adapters),
    keeps the frozen models in a tuple (not registered), and runs text encoder → UNet."""

    def __init__(self, net, text_encoder: nn.Module, unet: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.models = (text_encoder, unet)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        text_encoder, unet = self.models
        return unet(text_encoder(tokens))


def _pipeline(seed: int = 0):
    torch.manual_seed(seed)
    te = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8)).requires_grad_(False)
    unet = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 3)).requires_grad_(False)
    net = create_network({"lora_te": te, "lora_unet": unet}, algo="loha", dim=2, alpha=1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return _Pipeline(net, te, unet), net


def _ddp_pipeline_run(rank: int) -> dict:
    wrapper, net = _pipeline()
    ddp = DistributedDataParallel(wrapper)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    ddp(x.chunk(WORLD)[rank]).square().mean().backward()
    frozen = {id(p) for m in wrapper.models for p in m.parameters()}
    return {"grads": {n: p.grad.clone() for n, p in net.named_parameters()},
            "wrapped_host_tensors": sum(id(p) in frozen for p in ddp.module.parameters())}


def _fsdp_run(rank: int, name: str, mode: str, out_dir: Path) -> dict:
    from torch.distributed.fsdp import fully_shard

    algo, options = VARIANTS[name]
    model, net, batches = _model_and_batches(algo, options)
    host_before = _host_state(model)
    if mode == "adapters+host":
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer)
    fully_shard(net)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    grads = []
    for batch in batches:
        opt.zero_grad()
        net(batch.chunk(WORLD)[rank]).square().mean().backward()
        grads.append({n: p.grad.full_tensor() for n, p in net.named_parameters()})
        opt.step()
    net.unshard()  # every rank gathers; rank 0 writes
    if rank == 0:
        net.save(out_dir / f"fsdp-{mode}-{name}.safetensors")
    net.reshard()
    host_after = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    host_unchanged = all(torch.equal(v, host_before[k]) for k, v in host_after.items())
    return {"grads": grads, "host_unchanged": host_unchanged}


def _worker(rank: int, port: int, names: list[str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    out = Path(out_dir)
    results: dict[str, dict] = {}
    try:
        for name in names:
            runs = [("ddp", lambda: _ddp_run(rank, name, out))]
            runs += [(f"fsdp-{m}", lambda m=m: _fsdp_run(rank, name, m, out)) for m in _modes(name)]
            for engine, run in runs:
                try:
                    results[f"{engine}/{name}"] = run()
                except Exception:  # noqa: BLE001 — reported per variant by the parent
                    results[f"{engine}/{name}"] = {"error": traceback.format_exc()}
                dist.barrier()
        try:
            results["ddp-pipeline"] = _ddp_pipeline_run(rank)
        except Exception:  # noqa: BLE001
            results["ddp-pipeline"] = {"error": traceback.format_exc()}
        dist.barrier()
        try:
            results["ddp-module-dropout"] = _ddp_module_dropout_run(rank, out)
        except Exception:  # noqa: BLE001
            results["ddp-module-dropout"] = {"error": traceback.format_exc()}
        dist.barrier()
        try:
            results["sharded"] = _sharded_save_and_merge(rank, out)
        except Exception:  # noqa: BLE001
            results["sharded"] = {"error": traceback.format_exc()}
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), sorted(VARIANTS), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single_process(name: str) -> tuple[list[dict], dict[str, torch.Tensor], int]:
    """Gradients of each step and the final file tensors, training on the whole global batch."""
    algo, options = VARIANTS[name]
    model, net, batches = _model_and_batches(algo, options)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    grads = []
    for batch in batches:
        opt.zero_grad()
        model(batch).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
        opt.step()
    frozen = sum(p.numel() for p in model.parameters())
    return grads, net.file_state_dict(), frozen


def _assert_grads_equal(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected) == STEPS
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a.keys() == b.keys()
        for key in b:
            assert bool(b[key].abs().max() > 0), f"step {step}: {key} has no gradient"
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=lambda m: f"step {step} {key}: {m}")


def _assert_same_file(path: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(path)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


def _result(results: list[dict], key: str) -> list[dict]:
    out = [r[key] for r in results]
    errors = [r["error"] for r in out if "error" in r]
    assert not errors, errors[0]
    return out


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_ddp_gradients_equal_single_process_and_only_adapters_are_communicated(distributed, name):
    out, results = distributed
    ranks = _result(results, f"ddp/{name}")
    grads, file_tensors, frozen = _single_process(name)
    adapter_names = sorted(grads[0])
    adapter_numel = sum(g.numel() for g in grads[0].values())
    assert frozen >= adapter_numel
    for rank in ranks:
        _assert_grads_equal(rank["grads"], grads)
        # every all-reduce bucket holds adapter parameters only, and each step reduces all of them once
        assert len(rank["communicated"]) >= STEPS
        per_step = sorted(n for bucket in rank["communicated"] for n in bucket)
        assert per_step == sorted(adapter_names * STEPS)
        assert rank["wrapped_host_tensors"] == 0  # DDP holds (and broadcasts) none of the host's tensors
        assert rank["host_unchanged"] and rank["host_grads"] == 0
    files = [out / f"ddp-{name}-rank{r}.safetensors" for r in range(WORLD)]
    data = [f.read_bytes() for f in files]
    header = [int.from_bytes(d[:8], "little") for d in data]
    assert data[0][8 + header[0]:] == data[1][8 + header[1]:]  # identical tensors, byte for byte
    with safe_open(str(files[0]), "pt") as a, safe_open(str(files[1]), "pt") as b:
        assert a.metadata()["sshs_model_hash"] == b.metadata()["sshs_model_hash"]
    _assert_same_file(files[0], file_tensors)


def test_ddp_with_module_dropout_needs_find_unused_parameters_and_stays_in_sync(distributed):
    out, results = distributed
    ranks = _result(results, "ddp-module-dropout")
    assert sum(r["skipped"] for r in ranks) > 0  # some steps really left adapters out
    a, b = (load_file(out / f"ddp-module-dropout-rank{r}.safetensors") for r in range(WORLD))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_of_a_pipeline_network_through_a_wrapper_module(distributed):
    _, results = distributed
    wrapper, net = _pipeline()
    wrapper(torch.randn(8, 6, generator=torch.Generator().manual_seed(5))).square().mean().backward()
    for rank in _result(results, "ddp-pipeline"):
        assert rank["wrapped_host_tensors"] == 0
        assert rank["grads"].keys() == dict(net.named_parameters()).keys()
        assert {k.split("_")[1] for k in rank["grads"]} == {"te", "unet"}
        for n, p in net.named_parameters():
            torch.testing.assert_close(rank["grads"][n], p.grad, rtol=1e-5, atol=1e-7)


def _fsdp_params():
    params = []
    for name in sorted(VARIANTS):
        for mode in _modes(name):
            params.append(pytest.param(name, mode, id=f"{name}-{mode}"))
    return params


@pytest.mark.parametrize("name, mode", _fsdp_params())
def test_fully_shard_gradients_and_saved_file_equal_single_process(distributed, name, mode):
    out, results = distributed
    ranks = _result(results, f"fsdp-{mode}/{name}")
    grads, file_tensors, _ = _single_process(name)
    for rank in ranks:
        _assert_grads_equal(rank["grads"], grads)
        assert rank["host_unchanged"]
    _assert_same_file(out / f"fsdp-{mode}-{name}.safetensors", file_tensors)


def _sharded_save_and_merge(rank: int, out_dir: Path) -> dict:
    """What `save`, `merge` and `bake` do on a network whose parameters are sharded (not unshard()ed)."""
    from torch.distributed.fsdp import fully_shard

    from lycoris_like import AdapterError

    model, net, _ = _model_and_batches("lora", {})
    fully_shard(net)
    outcome = {}
    calls = (("save", lambda: net.save(out_dir / f"sharded{rank}.safetensors")), ("merge", net.merge), ("bake", net.bake))
    for what, call in calls:
        try:
            call()
            outcome[what] = "ok"
        except AdapterError as exc:
            outcome[what] = f"typed: {exc}"
        except Exception as exc:  # noqa: BLE001
            outcome[what] = f"untyped {type(exc).__name__}: {exc}"
    outcome["file_written"] = str((out_dir / f"sharded{rank}.safetensors").exists())
    return outcome


def test_saving_merging_or_baking_a_sharded_network_says_to_unshard_first(distributed):
    _, results = distributed
    for outcome in _result(results, "sharded"):
        assert outcome["file_written"] == "False"  # today too: nothing half-written
        for what in ("save", "merge", "bake"):
            assert outcome[what].startswith("typed:") and "unshard" in outcome[what], outcome[what]
