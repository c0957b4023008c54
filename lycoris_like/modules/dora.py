"""DoRA (Liu et al. 2024) as a variant of every ranked algorithm: `weight_decompose=True`.

W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm over one axis (`wd_on_out`: the output axis, LyCORIS's
default, or the input axis), `dora_scale` = m initialised to ‖W‖, the norm detached (the paper's
§4.3). With the runtime multiplier s the weight is W + s·(W' − W): s = 0 is the base exactly,
s = 1 is W' exactly. The registry combines this mixin with LoRA, LoHa and LoKr (`DoRALoRA`, …);
the wrapped algorithm's ΔW, bypass and file keys are used as they are.

Output axis, without training-time dropout: W'x = s ⊙ (Wx + ΔWx) per output channel, so the
forward adds (s − 1) ⊙ Wx + s ⊙ ΔWx to the host output (an `OutputMap`), ΔWx from the wrapped
algorithm's bypass — exact zeros at init, so the identity holds bit-exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ShapeMismatchError
from ..hosts import HostLayer
from ..kernels.dora import dora_delta, magnitude_scale, weight_norm
from .base import AdapterModule, add_scaled
from .capabilities import Bypass, OutputMap
from .ranked import RankedAdapter
from .registry import register_alias, register_variant


@register_variant("weight_decompose", applies_to=RankedAdapter, keys=("dora_scale",))
class DoRA(OutputMap):
    """The DoRA mixin (see the module docstring); `wd_on_out` picks the axis."""

    _inner_adds = False
    """Whether the wrapped algorithm has its own `add_delta` (set per combined class)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        inner = next(b for b in cls.__mro__[1:] if issubclass(b, AdapterModule) and not hasattr(b, "inner_weight"))
        cls._inner_adds = inner.add_delta is not AdapterModule.add_delta

    def __init__(self, host: HostLayer, *args: Any, weight_decompose: bool = True, wd_on_out: bool = True, **options: Any) -> None:
        super().__init__(host, *args, **options)
        self.wd_on_out = bool(wd_on_out)
        base = host.weight.detach().to(self.norm_dtype)
        self.dora_scale = nn.Parameter(weight_norm(base, self.wd_on_out).to(self.param_dtype))

    # ------------------------------------------------------------------ ΔW

    def inner_weight(self, train: bool = False, base: Tensor | None = None) -> Tensor:
        """W + ΔW of the wrapped algorithm, in merge precision (`base`: W already in it)."""
        acc = self.host.weight.to(self.merge_dtype) if base is None else base
        if self._inner_adds:
            return super().add_delta(acc, 1.0, train)  # type: ignore[misc]
        return acc + super().delta_weight(train).to(acc.dtype)  # type: ignore[misc]

    def delta_weight(self, train: bool = False) -> Tensor:
        weight = self.host.weight.to(self.merge_dtype)
        return dora_delta(weight, self.inner_weight(train, weight), self.dora_scale, self.wd_on_out)

    def add_delta(self, acc: Tensor, multiplier: float | Tensor, train: bool = False, inplace: bool = False) -> Tensor:
        """acc + m·(W' − W), the wrapped algorithm's W + ΔW built by its own `add_delta`."""
        return add_scaled(acc, self.delta_weight(train), multiplier, inplace)

    @property
    def norm_dtype(self) -> torch.dtype:
        """The precision of W + ΔW under the norm in the forward (and of m's initial ‖W‖): the
        parameters' own dtype when they are the host's (`dtype=torch.bfloat16` on a bf16 host: no
        casts, the norm accumulated in float32 by the reduction itself), else merge precision."""
        dtype = self.param_dtype
        return dtype if dtype == self.host.weight.dtype else self.merge_dtype

    def channel_scale(self) -> Tensor:
        """m / ‖W + ΔW‖ over the output axis, (out, 1, …), the norm built outside autocast."""
        with torch.autocast(self.host.weight.device.type, enabled=False):
            with torch.no_grad():
                merged = self.inner_weight(False, self.host.weight.to(self.norm_dtype))
            return magnitude_scale(merged, self.dora_scale, True)

    # ------------------------------------------------------------------ forward

    def fast_path(self, train: bool) -> str | None:
        """The output map on the output axis, when the wrapped algorithm has a bypass and no
        training-time dropout needs a separate path; else the forward rebuilds."""
        if not self.wd_on_out or not isinstance(self, Bypass) or super(OutputMap, self).fast_path(train) is None:
            return None
        if train and (self.dropout or self.rank_dropout):  # type: ignore[attr-defined]
            return None
        return "output"

    def output_map(self, base_out: Tensor, x: Tensor, multiplier: float | Tensor, train: bool = False) -> Tensor:
        """W_m·x + b with W_m = W + m·(W' − W): base_out + m·(s − 1) ⊙ (base_out − b) + m·s ⊙ ΔW·x,
        the last term by the wrapped algorithm's bypass with its output rows scaled by s — exact
        zeros at init (s = 1, ΔW = 0), so the output is the host's bit for bit."""
        host = self.host
        view = (-1, *([1] * len(host.kernel_size))) if host.is_conv else (-1,)
        s = self.channel_scale().reshape(view).to(base_out.dtype)
        bias = host.bias
        plain = base_out if bias is None else base_out - bias.to(base_out.dtype).reshape(view)
        change = s - 1 if not isinstance(multiplier, Tensor) and multiplier == 1 else (s - 1) * multiplier
        out = torch.addcmul(base_out, change, plain)
        return self.bypass_add(out, x, multiplier, train, row_scale=s)  # type: ignore[attr-defined]

    def fixed_flops(self) -> int:
        """The norm ‖W + ΔW‖, built once per forward."""
        return self.rebuild_flops()

    # ------------------------------------------------------------------ files

    def file_tensors(self) -> dict[str, Tensor]:
        return {**super().file_tensors(), "dora_scale": self.dora_scale.detach()}  # type: ignore[misc]

    @classmethod
    def from_file_tensors(cls, host: HostLayer, tensors: Mapping[str, Tensor], name: str, **options: Any) -> Any:
        """The wrapped algorithm's tensors, then `dora_scale`, whose shape gives the axis."""
        scale = tensors["dora_scale"]
        on_out = dora_axis(name, host, scale)
        own = {k: v for k, v in tensors.items() if k != "dora_scale"}
        options = {**options, "weight_decompose": True, "wd_on_out": on_out}
        module = super().from_file_tensors(host, own, name, **options)  # type: ignore[misc]
        with torch.no_grad():
            module.dora_scale.copy_(scale.reshape(module.dora_scale.shape))
        return module

    def config(self) -> dict[str, Any]:
        return {**super().config(), "weight_decompose": True, "wd_on_out": self.wd_on_out}  # type: ignore[misc]


def dora_axis(name: str, host: HostLayer, scale: Tensor) -> bool:
    """True for an output-axis `dora_scale` (out, 1, …), False for input-axis (1, in, …)."""
    dims = host.weight.dim()
    out_shape = (host.out_features,) + (1,) * (dims - 1)
    in_shape = (1, host.in_features) + (1,) * (dims - 2)
    if tuple(scale.shape) in (out_shape, out_shape[:1]):
        return True
    if tuple(scale.shape) == in_shape:
        return False
    raise ShapeMismatchError(
        f"{name}.dora_scale: expected shape {out_shape} (output axis) or {in_shape} (input axis), "
        f"found {tuple(scale.shape)}",
        keys=[f"{name}.dora_scale"],
    )


register_alias("dora", "lora", weight_decompose=True)  # the name users type: DoRA on LoRA
