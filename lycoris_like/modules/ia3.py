"""(IA)³: a learned vector l rescales the host's output (default) or input channels by (1 + m·l).

ΔW = W ⊙ l, broadcast over the output rows or the input columns (grouped convs: column `c` of
the rows of group `g` is input channel `g·in/groups + c`). On the output side the whole output is
rescaled, bias included, so Δb = b ⊙ l; on the input side the bias is untouched. Merge and the
unmerged forward therefore agree exactly. (LyCORIS 4.1.3's bypass forward scales the bias while
its merge does not; PEFT scales it in both, as we do.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import IncompatibleFileError
from ..hosts import HostLayer
from ..kernels.rescale import channel_scale_add
from .base import AdapterModule
from .capabilities import CombinePart, NativeCombine, NotNative, OutputMap
from .files import expect_shape, require_keys
from .registry import register_algorithm


@register_algorithm("ia3")
class IA3(OutputMap, NativeCombine, AdapterModule):
    """y = (1 + m·l) ⊙ op(x, W, b) (output side) or op((1 + m·l) ⊙ x, W, b) (`train_on_input`).

    `dim` and `alpha` are accepted (every algorithm takes them) and ignored: there is no rank and
    no merge ratio. `rank_dropout` masks entries of l in ΔW during training; Δb is never dropped
    (as for every algorithm, rank dropout acts on ΔW only).
    """

    file_keys = frozenset({"weight", "on_input"})
    signature_keys = frozenset({"on_input", "weight"})

    def __init__(
        self,
        host: HostLayer,
        dim: int = 1,
        alpha: float | None = None,
        *,
        train_on_input: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(host, **common)
        self.on_input = bool(train_on_input)
        self.channels = host.in_features * host.groups if self.on_input else host.out_features
        shape = (self.channels,) if host.kind == "linear" else (1, self.channels, *host.ones)
        self.weight = nn.Parameter(torch.zeros(shape, **self.factory()))

    # ------------------------------------------------------------------ ΔW, Δb

    def _vector(self, train: bool) -> tuple[Tensor, Tensor]:
        """(l, l with the training-time rank-dropout mask applied) as 1-D tensors."""
        vec = self.weight.reshape(self.channels)
        mask = self.rank_mask(self.channels, vec) if train else None
        return vec, vec if mask is None else vec * mask

    def _weight_scale(self, vec: Tensor) -> Tensor:
        """l laid out to broadcast against the host weight (out, in/groups, k…)."""
        host = self.host
        ones = host.ones
        if not self.on_input:
            return vec.reshape(host.out_features, 1, *ones)
        groups = host.groups
        if groups == 1:
            return vec.reshape(1, host.in_features, *ones)
        # Row o belongs to group o // (out/groups); its column c reads input channel g·(in/groups) + c.
        per_group = vec.reshape(groups, 1, host.in_features)
        rows = per_group.expand(groups, host.out_features // groups, host.in_features)
        return rows.reshape(host.out_features, host.in_features, *ones)

    def delta_weight(self, train: bool = False) -> Tensor:
        _, vec = self._vector(train)
        return self.host.weight.to(vec.dtype) * self._weight_scale(vec)

    def add_delta(self, acc: Tensor, multiplier: float | Tensor, train: bool = False, inplace: bool = False) -> Tensor:
        """W + m·W ⊙ l as one `addcmul` in merge precision (no full-size ΔW temporary)."""
        _, vec = self._vector(train)
        scale = self._weight_scale(vec.to(acc.dtype))
        weight = self.host.weight.to(acc.dtype)
        if isinstance(multiplier, Tensor):
            scale, multiplier = scale * multiplier.to(acc.dtype), 1.0
        return acc.addcmul_(weight, scale, value=multiplier) if inplace else torch.addcmul(acc, weight, scale, value=multiplier)

    def delta_bias(self) -> Tensor | None:
        if self.on_input or self.host.bias is None:
            return None
        return self.host.bias.to(self.weight.dtype) * self.weight.reshape(self.channels)

    # ------------------------------------------------------------------ output map

    def fast_path(self, train: bool) -> str | None:
        return None if self.on_input else "output"

    def _channel_view(self, vec: Tensor) -> Tensor:
        """`vec` shaped to broadcast on a host output's channel axis: last for Linear, the one
        before the spatial dims for convs (batched or not)."""
        if self.host.kind == "linear":
            return vec
        return vec.reshape(self.channels, *([1] * len(self.host.kernel_size)))

    def output_map(self, base_out: Tensor, x: Tensor, multiplier: float | Tensor, train: bool = False) -> Tensor:
        """base_out + m·base_out ⊙ l — the bias rescaled with the rest, as in the merge — in one
        op (`kernels.rescale`); with training-time dropout or rank dropout, the adapter's share
        base_out ⊙ l is formed on its own (rank dropout never drops Δb = b ⊙ l)."""
        vec, kept = self._vector(train)
        dtype = base_out.dtype
        if isinstance(multiplier, Tensor) or (train and (self.dropout or kept is not vec)):
            share = base_out * self._channel_view(kept.to(dtype))
            bias = self.host.bias
            if kept is not vec and bias is not None:
                share = share + self._channel_view((vec - kept).to(dtype) * bias.to(dtype))
            if train and self.dropout:
                share = F.dropout(share, self.dropout)
            if isinstance(multiplier, Tensor):
                return base_out + share * multiplier.to(dtype)
            return torch.add(base_out, share, alpha=multiplier)
        return channel_scale_add(base_out, self._channel_view(vec.to(dtype)), multiplier)

    def output_plan(self, multiplier: float | Tensor, train: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """The one-op rescale with the parameter dict and the channel layout bound."""
        if isinstance(multiplier, Tensor) or (train and (self.dropout or self.rank_dropout)):
            return super().output_plan(multiplier, train)
        params, shape = self._parameters, self._channel_view(self.weight).shape
        reshape = shape != self.weight.shape  # convs: (1, C, 1, …) → (C, 1, …); Linear: as stored

        def rescale(base_out: Tensor, x: Tensor) -> Tensor:
            vec = params["weight"]
            if vec.dtype != base_out.dtype:
                vec = vec.to(base_out.dtype)
            if reshape:
                vec = vec.view(shape)
            if multiplier == 1 and base_out.dtype is torch.float32 and torch.is_grad_enabled():
                return base_out * (vec + 1)  # the common training case of channel_scale_add, inline
            return channel_scale_add(base_out, vec, multiplier)
        return rescale

    def rebuild_flops(self) -> int:
        return self.host.weight.numel()

    def bypass_flops(self, tokens: int) -> int:
        return tokens * self.host.out_features

    # ------------------------------------------------------------------ files

    def file_tensors(self) -> dict[str, Tensor]:
        return {
            "weight": self.weight.detach(),
            "on_input": torch.tensor(int(self.on_input), dtype=torch.int64),
        }

    @classmethod
    def from_file_tensors(cls, host: HostLayer, tensors: Mapping[str, Tensor], name: str, **options: Any) -> IA3:
        require_keys(tensors, name, ("weight", "on_input"))
        flag = tensors["on_input"]
        value = float(flag.double().reshape(-1)[0]) if flag.numel() == 1 else None
        if value not in (0.0, 1.0):
            found = f"value {value}" if value is not None else f"shape {tuple(flag.shape)}"
            raise IncompatibleFileError(
                f"{name}.on_input: expected a single 0 (output side) or 1 (input side), found {found}",
                keys=[f"{name}.on_input"],
            )
        module = cls(host, train_on_input=value == 1.0, **options)
        weight = expect_shape(name, "weight", tensors["weight"], tuple(module.weight.shape))
        with torch.no_grad():
            module.weight.copy_(weight)
        return module

    def config(self) -> dict[str, Any]:
        return {"algo": self.algo, "train_on_input": self.on_input}

    @classmethod
    def combine_native(cls, parts: Sequence[CombinePart], build: Callable[[Mapping[str, Tensor]], Any],
                       base: Any, dtype: torch.dtype) -> tuple[dict[str, Tensor], int | None]:
        """Vectors on the same side add (ΔW = W ⊙ l is linear in l)."""
        if len({int(tensors["on_input"].reshape(-1)[0]) for _, tensors in parts}) != 1:
            raise NotNative("(IA)³ vectors on the input and on the output side do not add")
        return cls.summed(parts, ("weight",), dtype)
