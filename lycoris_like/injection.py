"""Attaching adapters to host layers by replacing the host's `forward` on the instance.

The host keeps its parameters and `state_dict()` keys; one `HostDispatch` per host applies every
attached adapter (from any number of networks) in one op on `W + Σ mᵢ·ΔWᵢ`, plus the cheap bypass
paths, and is removed — restoring the original forward exactly — when the last adapter leaves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .hosts import HostLayer
from .kernels.patch import patched_op
from .kernels.rebuild import rebuilt_op
from .kernels.rescale import rescale_, rescale_in_place_ok
from .modules.base import AdapterModule, adapted_parameters


class HostDispatch:
    """The replacement forward of one host layer."""

    def __init__(self, host: HostLayer) -> None:
        self.host = host
        self.adapters: list[AdapterModule] = []
        module = host.module
        self._own_forward = module.__dict__.get("forward")  # an instance-level forward set by others
        self.original_forward = module.forward

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # Plain loops (no generators or walrus): torch.compile traces this without graph breaks.
        rebuild: list[AdapterModule] = []
        bypass: list[AdapterModule] = []
        for adapter in self.adapters:
            if adapter.is_active():
                (bypass if adapter.use_bypass(x) else rebuild).append(adapter)
        if not rebuild and not bypass:
            return self.original_forward(x, *args, **kwargs)
        mapped = self._input_mapper(bypass, rebuild)
        if rebuild:  # a bypass that reads the pure host output cannot share the call with a rebuild
            for adapter in list(bypass):
                if adapter.reads_base_out and adapter.can_bypass:
                    bypass.remove(adapter)
                    rebuild.append(adapter)
        host = self.host
        patched = self._patched_out(x, rebuild) if len(rebuild) == 1 else None
        if patched is not None:
            base_out = patched
        elif rebuild:
            multipliers = [adapter.multiplier for adapter in rebuild]
            params = self._recompute_params(x, rebuild)
            if params:
                base_out = rebuilt_op(
                    x, lambda: adapted_parameters(host, rebuild, multipliers, train=True), host.op, host.op_grads, params
                )
            else:
                weight, bias = adapted_parameters(host, rebuild, multipliers, train=True)
                base_out = host.op(x, weight, bias)
        elif mapped is not None:
            bypass.remove(mapped)
            base_out = host.op(mapped.input_map(x), host.weight, host.bias)
        else:
            base_out = host.op(x, host.weight, host.bias)
        scale = None  # per-channel rescales ((IA)³): base_out ⊙ (1 + Σ mᵢ·sᵢ) in one multiply
        added: list[AdapterModule] = []
        for adapter in bypass:
            s = adapter.output_scale(base_out)
            if s is None:
                added.append(adapter)
            else:
                scale = s if scale is None else scale + s
        out = base_out if scale is None else self._rescaled(base_out, (1 + scale).to(base_out.dtype), added)
        for adapter in added:
            out = adapter.add_output(out, x, base_out)
        return out

    @staticmethod
    def _rescaled(base_out: Tensor, scale: Tensor, added: list[AdapterModule]) -> Tensor:
        """base_out ⊙ scale, written over base_out (the host op's own fresh output) where no other
        bypass still reads it and `kernels.rescale` applies; else the plain product."""
        if not added and rescale_in_place_ok(base_out, scale):
            return rescale_(base_out, scale)
        return base_out * scale

    @staticmethod
    def _input_mapper(bypass: list[AdapterModule], rebuild: list[AdapterModule]) -> AdapterModule | None:
        """The one bypass that maps the host's input, when it can: alone among the bypasses that need
        the pure host op and with no rebuild; otherwise every such adapter is moved to `rebuild`."""
        mappers: list[AdapterModule] = []
        pure = 0
        for adapter in bypass:
            if adapter.maps_input and adapter.can_bypass:
                mappers.append(adapter)
            if adapter.reads_base_out and adapter.can_bypass:
                pure += 1
        if not mappers:
            return None
        if len(mappers) == 1 and pure == 1 and not rebuild:
            return mappers[0]
        for adapter in mappers:
            bypass.remove(adapter)
            rebuild.append(adapter)
        return None

    def _patched_out(self, x: Tensor, rebuild: list[AdapterModule]) -> Tensor | None:
        """The host op with one adapter's few changed entries written into the host in place for
        the call (`kernels.patch`, SaRA), or None where that does not apply: the adapter has no
        entry patches, the host trains or is not contiguous, or — with autograd recording —
        the host has no `op_grads`, autocast is on, or torch.compile traces."""
        host, adapter = self.host, rebuild[0]
        tensors = (host.weight, host.bias)
        for t in tensors:
            if t is not None and (t.requires_grad or not t.is_contiguous()):
                return None
        if torch.compiler.is_compiling():
            return None
        grad = torch.is_grad_enabled()
        if grad and (not host.has_op_grads or torch.is_autocast_enabled(x.device.type)):
            return None
        patches = adapter.entry_patches(adapter.multiplier, train=True)
        if patches is None:
            return None
        params = [p for p in adapter.parameters() if p.requires_grad] if grad else []
        return patched_op(x, tensors, patches, host.op, host.op_grads, host.weight_grad_at, params)

    def _recompute_params(self, x: Tensor, rebuild: list[AdapterModule]) -> list[Tensor]:
        """The trainable tensors a rebuilt weight depends on, when the forward should use
        `kernels.rebuild` (training eagerly, no autocast); else an empty list."""
        host = self.host
        if not torch.is_grad_enabled() or not host.has_op_grads or torch.compiler.is_compiling():
            return []
        if torch.is_autocast_enabled(x.device.type):
            return []
        params = [p for adapter in rebuild for p in adapter.parameters() if p.requires_grad]
        if not params:
            return []
        return params + [p for p in (host.weight, host.bias) if p is not None and p.requires_grad]


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


def detach(adapter: AdapterModule) -> None:
    module = adapter.host.module
    dispatch = dispatch_of(module)
    if dispatch is None or adapter not in dispatch.adapters:
        return
    dispatch.adapters.remove(adapter)
    if not dispatch.adapters:
        if dispatch._own_forward is None:
            del module.__dict__["forward"]
        else:
            module.forward = dispatch._own_forward
