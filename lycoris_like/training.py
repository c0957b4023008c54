"""Training helpers: optimizer parameter groups with each algorithm's default learning rates."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


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
