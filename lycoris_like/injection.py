"""Attaching adapters to host layers by replacing the host's `forward` on the instance.

The host keeps its parameters and `state_dict()` keys. One `HostDispatch` per host holds the
adapters attached to it (from any number of networks), the forward plans built for them
(`lycoris_like.plan`), and the record of which networks merged into the host's tensors — library
state, never stored on the user's tensors. It is removed, restoring the original forward exactly,
when the last adapter leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import plan
from .errors import MergeError
from .hosts import HostLayer
from .modules.base import AdapterModule
from .modules.capabilities import ReadsHostWeight

MAX_PLANS = 64  # distinct call settings (input shapes) kept per layer before the cache starts over


@dataclass
class MergeRecord:
    """One network's merge into this host: the tensors it wrote and their versions afterwards."""

    owner: int
    tensors: list[tuple[Tensor, int]] = field(default_factory=list)

    def intact(self) -> bool:
        """Whether no one wrote to the merged tensors since (an optimizer step, a later merge)."""
        return all(t._version == version for t, version in self.tensors)

    def refresh(self) -> None:
        self.tensors = [(t, t._version) for t, _ in self.tensors]


class HostDispatch:
    """The replacement forward of one host layer: looks up the plan for this call's setting
    (built on first use) and runs it."""

    def __init__(self, host: HostLayer) -> None:
        self.host = host
        self.adapters: list[AdapterModule] = []
        self.merges: list[MergeRecord] = []
        self.plans: dict[tuple, plan.Plan] = {}
        module = self.module = host.module
        self._own_forward = module.__dict__.get("forward")  # an instance-level forward set by others
        self.original_forward = module.forward

    def __getstate__(self) -> dict[str, Any]:
        """Copies (deepcopy, pickle) start without plans: the plans' closures would still point at
        the original layer and adapters."""
        state = dict(self.__dict__)
        state["plans"] = {}
        return state

    def replan(self) -> None:
        """Forget the plans: a setting changed (multiplier, enable, merge, train/eval, dtype …)."""
        self.plans.clear()

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if torch.compiler.is_compiling():
            active = self.active()
            if not active:
                return self.original_forward(x, *args, **kwargs)
            autocast = torch.is_autocast_enabled(x.device.type)
            for adapter in active:
                require_pristine(adapter, self.merges, "forward")
            return plan.build(self.host, active, x, grad=torch.is_grad_enabled(), autocast=autocast, compiled=True)(x)
        grad = torch.is_grad_enabled()
        autocast = None
        if torch._C._is_any_autocast_enabled():
            device = x.device.type
            autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        key = (x.shape, x.dtype, x.device, grad, autocast, self.module.training)
        forward = self.plans.get(key)
        if forward is None:
            if len(self.plans) >= MAX_PLANS:
                self.plans.clear()
            forward = self.plans[key] = self._build(x, grad, autocast is not None)
        return forward(x, *args, **kwargs) if args or kwargs else forward(x)

    def active(self) -> list[AdapterModule]:
        return [a for a in self.adapters if a.enabled and not a.merged]

    def _build(self, x: Tensor, grad: bool, autocast: bool) -> plan.Plan:
        active = self.active()
        if not active:
            return self.original_forward
        for adapter in active:
            require_pristine(adapter, self.merges, "forward")
        droppable = [a for a in active if a.module_dropout and plan.adapter_train(a)]
        if not droppable:
            return plan.build(self.host, active, x, grad=grad, autocast=autocast)
        # Module dropout draws per call which adapters run; a plan per drawn set.
        subplans: dict[tuple[int, ...], plan.Plan] = {}
        host, original = self.host, self.original_forward

        def dropping(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            kept = tuple(i for i, a in enumerate(active) if a not in droppable or bool(torch.rand(()) >= a.module_dropout))
            forward = subplans.get(kept)
            if forward is None:
                chosen = [active[i] for i in kept]
                forward = subplans[kept] = plan.build(host, chosen, x, grad=grad, autocast=autocast) if chosen else original
            return forward(x, *args, **kwargs)
        return dropping


def dispatch_of(module: nn.Module) -> HostDispatch | None:
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, HostDispatch) else None


def attached_adapters(module: nn.Module) -> list[AdapterModule]:
    dispatch = dispatch_of(module)
    return list(dispatch.adapters) if dispatch else []


def attach(adapter: AdapterModule) -> None:
    module = adapter.host.module
    dispatch = dispatch_of(module)
    if dispatch is None:
        dispatch = HostDispatch(adapter.host)
        module.forward = dispatch
    if adapter not in dispatch.adapters:
        dispatch.adapters.append(adapter)
    adapter._replan = dispatch.replan
    dispatch.replan()


def detach(adapter: AdapterModule) -> None:
    module = adapter.host.module
    dispatch = dispatch_of(module)
    adapter.__dict__.pop("_replan", None)
    if dispatch is None or adapter not in dispatch.adapters:
        return
    dispatch.adapters.remove(adapter)
    dispatch.replan()
    if not dispatch.adapters:
        if dispatch._own_forward is None:
            del module.__dict__["forward"]
        else:
            module.forward = dispatch._own_forward


def merges_of(module: nn.Module) -> list[MergeRecord]:
    """The merge records of a host (empty when nothing is attached)."""
    dispatch = dispatch_of(module)
    return dispatch.merges if dispatch is not None else []


def require_pristine(adapter: AdapterModule, merges: list[MergeRecord], what: str) -> None:
    """Refuse (`MergeError`) an adapter that reads its ΔW from the host weight on a host another
    network has merged into (`ReadsHostWeight`)."""
    if merges and isinstance(adapter, ReadsHostWeight):
        reason = adapter.reads_host_weight()
        if reason:
            raise MergeError(f"{what}: {reason}, which a merged network has changed; unmerge that network first")
