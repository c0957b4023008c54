"""W + Σ mᵢ·ΔWᵢ, rounded once: what merges, bakes and the rebuild forward all compute."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..hosts import HostLayer, compute_dtype
from .base import AdapterModule
from .capabilities import EntryPatches


def merge_dtype(host: HostLayer, adapters: Sequence[AdapterModule]) -> torch.dtype:
    """The precision of the sum: a lone adapter's `merge_dtype`; several: the widest of theirs
    (an `EntryPatches` adapter asks for its `stacked_merge_dtype`, so the sum is rounded once)."""
    if len(adapters) == 1:
        return adapters[0].merge_dtype
    dtype = compute_dtype(host.weight.dtype)
    for adapter in adapters:
        dtype = torch.promote_types(dtype, adapter.stacked_merge_dtype if isinstance(adapter, EntryPatches) else adapter.merge_dtype)
    return dtype


def adapted_parameters(
    host: HostLayer,
    adapters: Sequence[AdapterModule],
    multipliers: Sequence[float | Tensor],
    trains: Sequence[bool] | None = None,
    inplace: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The host's weight and bias with `adapters` applied at `multipliers`, computed in
    `merge_dtype` and cast once to the host's dtypes. The rebuild forward and `merge()` both use
    this one function, so a merged model computes with the very same bits. `trains[i]`: apply
    adapter i's training-time randomness. `inplace` (merges, after backing the host up):
    accumulate into the host's own tensors when they are in merge precision, and return them."""
    dtype = merge_dtype(host, adapters)
    weight = host.weight.to(dtype)
    bias = None if host.bias is None else host.bias.to(dtype)
    trains = trains or [False] * len(adapters)
    for adapter, multiplier, train in zip(adapters, multipliers, trains):
        weight = adapter.add_delta(weight, multiplier, train, inplace)
        if bias is not None:
            bias = adapter.add_delta_bias(bias, multiplier, inplace)
    return weight.to(host.weight.dtype), None if bias is None else bias.to(host.bias.dtype)
