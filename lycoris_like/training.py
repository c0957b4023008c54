"""Training helpers: optimizer parameter groups with each algorithm's default learning rates, and
SaRA's training rules (the low-rank loss and progressive parameter adjustment)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError


def param_groups(network: nn.Module, lr: float | None = None) -> list[dict[str, Any]]:
    """Parameter groups for a torch optimizer over the adapters of `network`.

    With `lr` every parameter uses it. Without, each parameter gets its algorithm's default
    (`AdapterModule.default_lr`: SVDiff's 1e-3 for spectral shifts, SaRA's 1e-3·exp(−350θ), …)
    and parameters without one get no `lr` key, so the optimizer's own `lr` applies:
    `torch.optim.AdamW(net.param_groups(), lr=1e-4)`.
    """
    if lr is not None:
        return [{"params": [p for p in network.parameters() if p.requires_grad], "lr": float(lr)}]
    groups: dict[float | None, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for adapter in _adapters(network):
        for name, param in adapter.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                groups.setdefault(adapter.default_lr(name), []).append(param)
    return [{"params": params} if rate is None else {"params": params, "lr": rate} for rate, params in groups.items()]


def _adapters(network: nn.Module) -> Iterable[Any]:
    from .modules.base import AdapterModule

    return (m for m in network.modules() if isinstance(m, AdapterModule))


# --------------------------------------------------------------------------- SaRA training rules


def sara_adapters(network: nn.Module) -> list[Any]:
    """The SaRA adapters of `network`, in module order."""
    from .modules.sara import SaRA

    return [m for m in network.modules() if isinstance(m, SaRA)]


def rank_loss_candidates(network: nn.Module) -> list[Any]:
    """SaRA adapters eligible for the low-rank loss, in module order: a 2-D host weight whose
    smaller side exceeds 64, with entries still being trained."""
    return [
        a for a in sara_adapters(network)
        if a.host.weight.dim() == 2 and min(a.host.weight.shape) > 64 and a.sparse_weight.index.numel() > 0
    ]


def sara_rank_loss(network: nn.Module, weight: float = 5e-3, *, generator: torch.Generator | None = None) -> Tensor:
    """λ·‖W ⊙ M‖_* for ONE eligible matrix drawn uniformly at random (from `generator`, else torch's
    global generator) — the SaRA paper's low-rank loss. W ⊙ M is the matrix of the trained values v
    on the current mask (zero elsewhere), so the gradient λ·(U·Vᵀ)[M] reaches v; add the result to
    the training loss before `backward()`. A zero tensor when no matrix is eligible or λ = 0."""
    from .kernels.sparse import nuclear_norm, scatter

    weight = float(weight)
    if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"the rank-loss weight must be finite and ≥ 0, got {weight!r}")
    candidates = rank_loss_candidates(network)
    if not candidates or weight == 0:
        return torch.zeros(())
    device = generator.device if generator is not None else "cpu"
    pick = int(torch.randint(len(candidates), (1,), generator=generator, device=device))
    part = candidates[pick].sparse_weight
    matrix = scatter(part.numel, part.index, part.values).reshape(part.shape)
    return weight * nuclear_norm(matrix)


class SaRARankLoss:
    """`sara_rank_loss` with its own seeded generator: `rank_loss = SaRARankLoss(net, seed=0)`,
    then `(loss + rank_loss()).backward()` every step draws one matrix reproducibly."""

    def __init__(self, network: nn.Module, weight: float = 5e-3, seed: int = 0) -> None:
        self.network = network
        self.weight = float(weight)
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self) -> Tensor:
        return sara_rank_loss(self.network, self.weight, generator=self.generator)


@torch.no_grad()
def progressive_adjust(network: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """The SaRA paper's progressive parameter adjustment: M ← M ∧ (|W| < θ). Entries whose trained
    value left (−θ, θ) stop training and stay frozen at their learned values (the adapted weights do
    not change). Each SaRA parameter shrinks in place — the same Parameter object, so optimizer
    param groups keep working — and its `.grad` and every per-entry state tensor of `optimizer`
    (Adam's moments, SGD's momentum, …) are sliced the same way, so the kept entries continue
    exactly as before. Returns how many entries were frozen."""
    from .kernels.sparse import threshold_tensor

    frozen = 0
    for adapter in sara_adapters(network):
        for part in adapter.parts:
            values = part.values
            theta = threshold_tensor(adapter.threshold, values.dtype, values.device)
            keep = values.detach().abs() < theta
            if bool(keep.all()):
                continue
            old_shape = values.shape
            state = optimizer.state.get(values) if optimizer is not None else None
            part.shrink(keep)
            frozen += int((~keep).sum())
            if state:
                for key, tensor in list(state.items()):
                    if key != "step" and isinstance(tensor, Tensor) and tensor.shape == old_shape:
                        state[key] = tensor[keep]
    return frozen


def progressive_schedule(network: nn.Module, optimizer: torch.optim.Optimizer, at_step: int) -> Any:
    """Run `progressive_adjust(network, optimizer)` once, right after the optimizer's `at_step`-th
    `step()` (the paper: 2,500 of 5,000). Returns the hook handle (`.remove()` cancels it)."""
    if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step <= 0:
        raise ConfigError(f"at_step must be a positive integer, got {at_step!r}")
    count = 0

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        nonlocal count
        count += 1
        if count == at_step:
            progressive_adjust(network, opt)

    return optimizer.register_step_post_hook(hook)
