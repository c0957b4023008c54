"""Checkpoint resume (issue 7): `network.state_dict()` + `optimizer.state_dict()` (+ the RNG state,
for dropout) saved mid-run and loaded into a freshly built network and optimizer — as a new
process would — give exactly the steps an uninterrupted run takes, for every algorithm.

Checked bit for bit: every parameter after every resumed step, and the model's output. The
checkpoint goes through a real file read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lycoris_like import create_network

from conftest import bits
from test_hostile_files import all_variants
from test_properties import with_sparse_threshold

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = all_variants()
STEPS, RESUME_AT = 5, 2


class Block(nn.Module):
    """Linear, Conv2d k=3 and Conv1d k=1 hosts in one small trainable block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.point = nn.Conv1d(8, 6, 1)
        self.head = nn.Linear(6 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.conv(x)).flatten(2)
        return self.head(self.point(h).flatten(1))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 5, generator=g)) for _ in range(STEPS)]


def _dropouts(algo: str) -> dict:
    """Training-time randomness, so the RNG state is part of what a checkpoint must carry."""
    return {"dropout": 0.1, "module_dropout": 0.1, "rank_dropout": 0.2}  # SaRA: drops single entries


def _setup(name: str, init_seed: int):
    """The base model (always the same weights) and a fresh network + optimizer on it."""
    algo, options = VARIANTS[name]
    torch.manual_seed(0)
    model = Block().requires_grad_(False)
    torch.manual_seed(init_seed)  # a resumed run starts from different initial adapters
    net = create_network(model, algo=algo, dim=2, alpha=1, **with_sparse_threshold(algo, options), **_dropouts(algo))
    with torch.no_grad():
        g = torch.Generator().manual_seed(init_seed)
        for p in net.parameters():  # start away from identity, so every parameter gets a gradient
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    # Each algorithm's parameter groups (SaRA's default rate at this test's large θ is ~1e-31: set one)
    groups = net.param_groups(lr=1e-2 if algo == "sara" else None)
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.01)
    return model, net, opt


def _step(model: nn.Module, net, opt, batch) -> None:
    model.train()
    net.train()
    x, y = batch
    opt.zero_grad()
    (model(x) - y).square().mean().backward()
    opt.step()


def _params(net) -> dict[str, torch.Tensor]:
    return {k: bits(v.detach()).clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_resuming_from_state_dicts_gives_the_uninterrupted_steps(tmp_path, name):
    batches = _batches()
    model, net, opt = _setup(name, init_seed=1)
    torch.manual_seed(100)
    expected = []
    checkpoint = tmp_path / "checkpoint.pt"
    for step in range(STEPS):
        if step == RESUME_AT:
            torch.save({"network": net.state_dict(), "optimizer": opt.state_dict(),
                        "rng": torch.get_rng_state(), "step": step}, checkpoint)
        _step(model, net, opt, batches[step])
        expected.append(_params(net))
    model.eval()
    with torch.no_grad():
        expected_out = bits(model(batches[0][0])).clone()
    assert any(not torch.equal(expected[0][k], expected[-1][k]) for k in expected[0]), "training moved nothing"
    net.remove()

    # A new process: the same base model, a network built the same way, and the checkpoint.
    model, net, opt = _setup(name, init_seed=2)
    state = torch.load(checkpoint, weights_only=True)
    net.load_state_dict(state["network"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    for step in range(state["step"], STEPS):
        _step(model, net, opt, batches[step])
        got = _params(net)
        assert got.keys() == expected[step].keys()
        differ = [k for k in got if not torch.equal(got[k], expected[step][k])]
        assert not differ, f"step {step}: {differ}"
    model.eval()
    with torch.no_grad():
        assert torch.equal(bits(model(batches[0][0])), expected_out)


def _adjusted_sara_checkpoint(batches):
    """A SaRA run stopped after a progressive adjustment: (its checkpoint, the network, optimizer, model)."""
    from lycoris_like.training import progressive_adjust

    model, net, opt = _setup("sara", init_seed=1)
    torch.manual_seed(100)
    for step in range(RESUME_AT):
        _step(model, net, opt, batches[step])
    with torch.no_grad():  # push some entries past θ, so the adjustment freezes them
        for adapter in net:
            adapter.sparse_weight.values[::3] += 1.0
    assert progressive_adjust(net, opt) > 0
    state = {"network": net.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
    return state, model, net, opt


def test_resuming_sara_after_progressive_adjustment(tmp_path):
    """The trained/frozen split is part of the checkpoint: a fresh (unadjusted) network takes it."""
    batches = _batches()
    state, model, net, opt = _adjusted_sara_checkpoint(batches)
    torch.save(state, tmp_path / "checkpoint.pt")
    expected = []
    for step in range(RESUME_AT, STEPS):
        _step(model, net, opt, batches[step])
        expected.append(_params(net))
    model.eval()
    with torch.no_grad():
        expected_out = bits(model(batches[0][0]))
    net.remove()
    model, net, opt = _setup("sara", init_seed=2)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    net.load_state_dict(state["network"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    for i, step in enumerate(range(RESUME_AT, STEPS)):
        _step(model, net, opt, batches[step])
        got = _params(net)
        assert all(torch.equal(got[k], expected[i][k]) for k in expected[i])
    model.eval()
    with torch.no_grad():  # the frozen entries came back too
        assert torch.equal(bits(model(batches[0][0])), expected_out)


def test_a_sara_checkpoint_of_another_mask_is_refused():
    state, *_ = _adjusted_sara_checkpoint(_batches())
    torch.manual_seed(0)
    model = Block().requires_grad_(False)
    net = create_network(model, algo="sara", threshold=0.1)  # another θ: another mask
    with pytest.raises(RuntimeError, match="not this layer's"):
        net.load_state_dict(state["network"])
