"""Per-layer forward plans: which path each adapter of a host takes, chosen ahead of the call.

A plan is a closure `x → y` built for one host, its active adapters and one call setting (input
shape and dtype, autocast, grad mode, train/eval). Everything that does not change between calls is
decided here — the path of each adapter (rebuild, patch, bypass, output map, input map, or a
separate op for training-time dropout), the multipliers as floats folded into the kernels'
scalars, which ops run at all — so the hot forward only executes it. `injection.HostDispatch`
caches plans per setting and drops them when a setting of the network changes.

Paths (see `modules.capabilities`):

- rebuild — y = op(x, W + Σ mᵢ·ΔWᵢ, b + Σ mᵢ·Δbᵢ) in one host op (`modules.compose`); while
  training eagerly the rebuilt weight is recomputed in backward instead of kept (`kernels.rebuild`),
  and a lone adapter with entry patches writes them into the host in place (`kernels.patch`);
- bypass — host(x) + m·ΔW·x (`Bypass.bypass_add`);
- output — f(host(x)) from the pure host output (`OutputMap`);
- input — host(g(x)) (`InputMap`);
- separate — host(x) + m·dropout(op(x, ΔW, Δb)): training-time dropout without a fast path.

An adapter that needs the pure host op (output/input maps) shares it with no rebuild and no other
such adapter; otherwise it rebuilds too. Under `torch.compile` the plan is made while tracing,
with the multipliers as tensors (changing one never recompiles) and no custom-kernel paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .hosts import HostLayer
from .kernels.patch import patched_op
from .kernels.rebuild import rebuilt_op
from .modules.base import AdapterModule
from .modules.capabilities import EntryPatches, FastPath
from .modules.compose import adapted_parameters

Plan = Callable[..., Tensor]
FORWARD_MODES = ("auto", "rebuild", "bypass")
READERS = ("output", "input")
RECOMPUTE_ENTRIES = 1 << 16
"""Host weights this large or larger recompute their rebuilt weight in backward instead of keeping
it alive (`kernels.rebuild`): below it the saved memory is not worth a Python backward."""
LAUNCH_FLOPS = {"cpu": 100_000, "cuda": 10_000_000}
"""What one kernel launch costs, in multiply-adds (≈ 2 µs on a CPU core, ≈ 5 µs of a GPU's
throughput): at small sizes the path with fewer kernels wins."""


def adapter_train(adapter: AdapterModule) -> bool:
    """Whether training-time randomness applies to this adapter now."""
    return adapter.training and adapter.host.module.training


def choose_path(adapter: AdapterModule, x: Tensor, grad: bool | None = None) -> str:
    """The path of one adapter for input `x`: dropout needs a separate one; else `forward_mode`
    decides, or (auto) the cheaper of the rebuild and the adapter's fast path by its costs."""
    train = adapter_train(adapter)
    kind = adapter.fast_path(train) if isinstance(adapter, FastPath) else None
    if train and adapter.dropout:
        return kind or "separate"
    mode = adapter.forward_mode
    if kind is None or mode == "rebuild":
        return "rebuild"
    if mode == "bypass":
        return kind
    host = adapter.host
    tokens = host.tokens(x)
    fast, fixed, rebuild = adapter.bypass_flops(tokens), adapter.fixed_flops(), adapter.rebuild_flops()
    # Kernels beyond the path's own two: casts of parameters to the compute dtype, and (a
    # half-precision host) widening W for the rebuild and casting it back.
    compute = x.dtype if x.is_floating_point() else host.weight.dtype
    widened = adapter.merge_dtype != host.weight.dtype
    fast_kernels = 2 + sum(p.dtype != compute for p in adapter.parameters())
    rebuild_kernels = 2 + sum(p.dtype != adapter.merge_dtype for p in adapter.parameters()) + 2 * widened
    if widened:
        rebuild += 2 * host.weight.numel()
    launch = LAUNCH_FLOPS.get(x.device.type, LAUNCH_FLOPS["cpu"])
    grad = torch.is_grad_enabled() if grad is None else grad
    if grad and any(p.requires_grad for p in adapter.parameters()):
        # Backward roughly doubles each path's kernels; rebuilding also forms the full weight
        # gradient (tokens·|W|), the fast path runs ~3× its forward.
        fast_cost = 3 * fast + fixed + 3 * fast_kernels * launch
        rebuild_cost = rebuild + tokens * host.weight.numel() + 3 * rebuild_kernels * launch
    else:
        fast_cost = fast + fixed + fast_kernels * launch
        rebuild_cost = rebuild + rebuild_kernels * launch
    return kind if fast_cost <= rebuild_cost else "rebuild"


def _multiplier(adapter: AdapterModule, compiled: bool) -> float | Tensor:
    return adapter.multiplier if compiled else adapter.multiplier_value


def build(host: HostLayer, adapters: Sequence[AdapterModule], x: Tensor, *, grad: bool, autocast: bool,
          compiled: bool = False) -> Plan:
    """The plan for `adapters` (all active) on `host` for calls like this one."""
    paths = [choose_path(a, x, grad) for a in adapters]
    readers = [i for i, p in enumerate(paths) if p in READERS]
    if len(readers) > 1 or (readers and "rebuild" in paths):
        for i in readers:  # they need the pure host op: rebuild with the others (dropout: separately)
            paths[i] = "separate" if adapter_train(adapters[i]) and adapters[i].dropout else "rebuild"
    if len(adapters) == 1:
        return _single(host, adapters[0], paths[0], grad=grad, autocast=autocast, compiled=compiled)
    return _composed(host, list(adapters), paths, grad=grad, autocast=autocast, compiled=compiled)


def _single(host: HostLayer, adapter: AdapterModule, path: str, *, grad: bool, autocast: bool, compiled: bool) -> Plan:
    m = _multiplier(adapter, compiled)
    train = adapter_train(adapter)
    op, weight_of, bias_of = host.op_fn(), host.tensor_getter("weight"), host.tensor_getter("bias")
    if path == "bypass":
        add = adapter.bypass_plan(m, train)  # type: ignore[attr-defined]
        return lambda x, *a, **k: add(op(x, weight_of(), bias_of()), x)
    if path == "output":
        out_map = adapter.output_plan(m, train)  # type: ignore[attr-defined]
        return lambda x, *a, **k: out_map(op(x, weight_of(), bias_of()), x)
    if path == "input":
        in_map = adapter.input_map  # type: ignore[attr-defined]
        return lambda x, *a, **k: op(in_map(x, m, train), weight_of(), bias_of())
    if path == "separate":
        return _composed(host, [adapter], [path], grad=grad, autocast=autocast, compiled=compiled)
    return _rebuild(host, [adapter], [m], [train], grad=grad, autocast=autocast, compiled=compiled)


def _rebuild(host: HostLayer, adapters: list[AdapterModule], ms: list[float | Tensor], trains: list[bool], *,
             grad: bool, autocast: bool, compiled: bool, patch: bool = True) -> Plan:
    """op(x, W + Σ mᵢ·ΔWᵢ, b + Σ mᵢ·Δbᵢ): patched in place, recomputed in backward, or plain. The
    weight is built without autocast — in merge precision, the very bits `merge()` writes — and
    the host op then runs under the caller's autocast."""
    device = host.weight.device.type

    def parameters() -> tuple[Tensor, Tensor | None]:
        if autocast:
            with torch.autocast(device, enabled=False):
                return adapted_parameters(host, adapters, ms, trains)
        return adapted_parameters(host, adapters, ms, trains)

    if patch and len(adapters) == 1 and isinstance(adapters[0], EntryPatches) and not compiled:
        patched = _patched(host, adapters[0], ms[0], trains[0], grad=grad, autocast=autocast)
        if patched is not None:
            return patched
    if grad and not autocast and not compiled and host.has_op_grads and host.weight.numel() >= RECOMPUTE_ENTRIES:
        def recomputed(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            params = [p for a in adapters for p in a.parameters() if p.requires_grad]
            if not params:
                weight, bias = parameters()
                return host.op(x, weight, bias)
            params += [p for p in (host.weight, host.bias) if p is not None and p.requires_grad]
            return rebuilt_op(x, parameters, host.op, host.op_grads, params)
        return recomputed

    def plain(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        weight, bias = parameters()
        return host.op(x, weight, bias)
    return plain


def _patched(host: HostLayer, adapter: Any, m: float, train: bool, *, grad: bool, autocast: bool) -> Plan | None:
    """The host op with the adapter's few changed entries written into the host in place for the
    call (`kernels.patch`), where that applies: a frozen, contiguous host, and — with autograd
    recording — a host with `op_grads` and no autocast. The patches themselves may still decline
    per call (None: rebuild)."""
    tensors = (host.weight, host.bias)
    for t in tensors:
        if t is not None and (t.requires_grad or not t.is_contiguous()):
            return None
    if grad and (not host.has_op_grads or autocast):
        return None
    fallback = _rebuild(host, [adapter], [m], [train], grad=grad, autocast=autocast, compiled=False, patch=False)

    def patched(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        patches = adapter.entry_patches(m, train)
        if patches is None:
            return fallback(x)
        params = [p for p in adapter.parameters() if p.requires_grad] if grad else []
        return patched_op(x, (host.weight, host.bias), patches, host.op, host.op_grads, host.weight_grad_at, params)
    return patched


def _separate(host: HostLayer, adapter: AdapterModule, m: float | Tensor, train: bool) -> Callable[[Tensor, Tensor], Tensor]:
    """out + m·dropout(op(x, ΔW, Δb)): the path training-time dropout takes without a fast path."""
    def add(out: Tensor, x: Tensor) -> Tensor:
        delta_bias = adapter.delta_bias()
        dtype = x.dtype if x.is_floating_point() else host.weight.dtype  # embeddings: x holds indices
        y = host.op(x, adapter.delta_weight(train).to(dtype), None if delta_bias is None else delta_bias.to(dtype))
        if train and adapter.dropout:
            y = F.dropout(y, adapter.dropout)
        return out + y.to(out.dtype) * m if isinstance(m, Tensor) else torch.add(out, y.to(out.dtype), alpha=m)
    return add


def _composed(host: HostLayer, adapters: list[AdapterModule], paths: list[str], *, grad: bool, autocast: bool,
              compiled: bool) -> Plan:
    """Several adapters on one host: the rebuilds in one op (or the one input map), then the one
    output map, then every additive path."""
    ms = [_multiplier(a, compiled) for a in adapters]
    trains = [adapter_train(a) for a in adapters]
    rebuild = [i for i, p in enumerate(paths) if p == "rebuild"]
    mapped_in = next((i for i, p in enumerate(paths) if p == "input"), None)
    mapped_out = next((i for i, p in enumerate(paths) if p == "output"), None)
    if rebuild:
        base = _rebuild(host, [adapters[i] for i in rebuild], [ms[i] for i in rebuild], [trains[i] for i in rebuild],
                        grad=grad, autocast=autocast, compiled=compiled)
    elif mapped_in is not None:
        mapper, m_in, t_in = adapters[mapped_in], ms[mapped_in], trains[mapped_in]

        def base(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            return host.op(mapper.input_map(x, m_in, t_in), host.weight, host.bias)  # type: ignore[attr-defined]
    else:
        def base(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            return host.op(x, host.weight, host.bias)
    steps: list[Callable[[Tensor, Tensor], Tensor]] = []
    if mapped_out is not None:
        steps.append(adapters[mapped_out].output_plan(ms[mapped_out], trains[mapped_out]))  # type: ignore[attr-defined]
    for i, path in enumerate(paths):
        if path == "bypass":
            steps.append(adapters[i].bypass_plan(ms[i], trains[i]))  # type: ignore[attr-defined]
        elif path == "separate":
            steps.append(_separate(host, adapters[i], ms[i], trains[i]))

    def composed(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = base(x)
        for step in steps:
            out = step(out, x)
        return out
    return composed
