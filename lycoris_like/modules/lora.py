"""LoRA / LoCon: ΔW = γ·B·A, with an optional Tucker core for k>1 convolutions (LyCORIS App. B.2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import IncompatibleFileError, ShapeMismatchError
from ..hosts import HostLayer
from ..kernels.lowrank import lowrank_add, lowrank_delta
from .base import add_scaled
from .capabilities import Bypass, CombinePart, Factored, NativeCombine, NotNative, WeightFree
from .files import expect_shape, read_alpha, require_keys
from .ranked import RankedAdapter
from .registry import register_algorithm


class Factor(nn.Module):
    """Holds one factor as `<name>.weight`, the key layout LyCORIS and kohya files use."""

    def __init__(self, tensor: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(tensor)


@register_algorithm("lora", aliases=("locon",))
class LoRA(Bypass, WeightFree, NativeCombine, Factored, RankedAdapter):
    """ΔW = (α/r)·up·down. `use_tucker` adds a core `lora_mid` (r, r, k…) for k>1 convs.

    `rs_lora` uses α/√r and stores α·√r in files so any reader recovers the same scale;
    `use_scalar` trains an extra scalar (init 0, `lora_up` random) folded into `lora_up` on save.
    """

    file_keys = frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"})
    signature_keys = frozenset({"lora_down.weight", "lora_up.weight"})
    bypass_dropout = True

    def __init__(self, host: HostLayer, dim: int = 4, alpha: float | None = 1.0, **options: Any) -> None:
        super().__init__(host, dim, alpha, **options)
        rank, k, ones, fac = self.rank, host.kernel_size, host.ones, self.factory()
        self.lora_down = Factor(torch.empty(rank, host.in_features, *(ones if self.tucker else k), **fac))
        self.lora_mid = Factor(torch.empty(rank, rank, *k, **fac)) if self.tucker else None
        self.lora_up = Factor(torch.empty(host.out_features, rank, *ones, **fac))
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        if self.lora_mid is not None:
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))
        if self.scalar is not None:  # the scalar (init 0) makes ΔW = 0; up may then be random
            nn.init.kaiming_uniform_(self.lora_up.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_up.weight)

    # ------------------------------------------------------------------ ΔW

    def _up(self, mask: Tensor | None = None) -> Tensor:
        """`lora_up` with the scalar folded in (as saved) and an optional rank mask; γ not applied."""
        up = self.with_scalar(self.lora_up.weight)
        if mask is not None:
            up = up * mask.view(1, -1, *([1] * (up.dim() - 2)))
        return up

    def delta_weight(self, train: bool = False) -> Tensor:
        mid = self.lora_mid.weight if self.lora_mid is not None else None
        mask = self.rank_mask(self.rank, self.lora_up.weight) if train else None
        return lowrank_delta(self._up(mask) * self.scale, self.lora_down.weight, mid)

    def add_delta(self, acc: Tensor, multiplier: float | Tensor, train: bool = False, inplace: bool = False) -> Tensor:
        """W + m·γ·up·down as one `addmm` in merge precision, m·γ its alpha: no full-size ΔW, and a
        merge writes straight into W (Tucker, a tensor multiplier and a non-contiguous W take the
        generic path)."""
        if self.lora_mid is not None or isinstance(multiplier, Tensor) or not acc.is_contiguous():
            return add_scaled(acc, LoRA.delta_weight(self, train), multiplier, inplace)  # this algorithm's ΔW, also under DoRA
        mask = self.rank_mask(self.rank, self.lora_up.weight) if train else None
        up = self._up(mask).reshape(acc.shape[0], self.rank).to(acc.dtype)
        down = self.lora_down.weight.reshape(self.rank, -1).to(acc.dtype)
        flat = acc.view(acc.shape[0], -1)
        alpha = multiplier * self.scale
        return (flat.addmm_(up, down, alpha=alpha) if inplace else torch.addmm(flat, up, down, alpha=alpha)).view(acc.shape)

    # ------------------------------------------------------------------ bypass

    def fast_path(self, train: bool) -> str | None:
        return "bypass" if self.host.groups == 1 else None

    def _down_path(self, x: Tensor, train: bool) -> Tensor:
        """The rank-r activations: down (and the Tucker core) in the host's geometry, dropout on them."""
        host = self.host
        down = self.lora_down.weight.to(x.dtype)
        if self.lora_mid is not None:
            h = host.op(host.pointwise(x, down), self.lora_mid.weight.to(x.dtype), None)
        else:
            h = host.op(x, down, None)
        if train and self.dropout:
            h = F.dropout(h, self.dropout)
        return h

    def bypass(self, x: Tensor, train: bool = False) -> Tensor:
        h = self._down_path(x, train)
        mask = self.rank_mask(self.rank, h) if train else None
        return self.host.pointwise(h, (self._up(mask) * self.scale).to(x.dtype))

    def bypass_add(self, out: Tensor, x: Tensor, multiplier: float | Tensor, train: bool = False,
                   row_scale: Tensor | None = None) -> Tensor:
        """out + m·γ·up(down(x)) by `kernels.lowrank.lowrank_add` (m·γ the gemm's alpha); the
        generic path for a Tucker core, training-time dropout and a tensor multiplier (compile)."""
        if (self.lora_mid is not None or isinstance(multiplier, Tensor)
                or (train and (self.dropout or self.rank_dropout))):
            return super().bypass_add(out, x, multiplier, train, row_scale)
        dtype, host = out.dtype, self.host
        up = self.lora_up.weight if self.scalar is None else self.lora_up.weight * self.scalar
        if row_scale is not None:
            up = up * row_scale.reshape(-1, *([1] * (up.dim() - 1))).to(up.dtype)
        down = self.lora_down.weight
        if down.dtype != dtype:
            down, up = down.to(dtype), up.to(dtype)
        h = host.op(x if x.dtype == dtype else x.to(dtype), down, None)
        return lowrank_add(out, h, up, multiplier * self.scale, host.spatial, fused=row_scale is not None)

    def bypass_plan(self, multiplier: float | Tensor, train: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """The fused bypass with the factors' parameter dicts, the host op and m·γ bound."""
        if (self.lora_mid is not None or self.scalar is not None or isinstance(multiplier, Tensor)
                or (train and (self.dropout or self.rank_dropout))):
            return super().bypass_plan(multiplier, train)
        ups, downs = self.lora_up._parameters, self.lora_down._parameters
        op, scale, spatial = self.host.op_fn(), multiplier * self.scale, self.host.spatial

        def add(out: Tensor, x: Tensor) -> Tensor:
            up, down, dtype = ups["weight"], downs["weight"], out.dtype
            if down.dtype != dtype:
                up, down = up.to(dtype), down.to(dtype)
            h = op(x if x.dtype == dtype else x.to(dtype), down, None)
            if not spatial and out.dim() == 2:  # the common Linear case, inline
                return torch.addmm(out, h, up.t(), alpha=scale)
            return lowrank_add(out, h, up, scale, spatial)
        return add

    def rebuild_flops(self) -> int:
        host = self.host
        core = self.rank * self.rank * host.kernel_numel * host.out_features if self.tucker else 0
        return host.out_features * host.in_features * host.kernel_numel * self.rank + core

    def bypass_flops(self, tokens: int) -> int:
        host = self.host
        k = host.kernel_numel
        down = host.in_features * (1 if self.tucker else k) + (self.rank * k if self.tucker else 0)
        return tokens * self.rank * (down + host.out_features)

    # ------------------------------------------------------------------ files

    def file_tensors(self) -> dict[str, Tensor]:
        out = {
            "lora_down.weight": self.lora_down.weight.detach(),
            "lora_up.weight": self.with_scalar(self.lora_up.weight).detach(),
            "alpha": self.alpha_tensor(),
        }
        if self.lora_mid is not None:
            out["lora_mid.weight"] = self.lora_mid.weight.detach()
        return out

    @classmethod
    def from_file_tensors(cls, host: HostLayer, tensors: Mapping[str, Tensor], name: str, **options: Any) -> LoRA:
        require_keys(tensors, name, ("lora_down.weight", "lora_up.weight"))
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        mid = tensors.get("lora_mid.weight")
        if down.dim() < 2 or down.shape[0] == 0:
            raise ShapeMismatchError(
                f"{name}.lora_down.weight: expected shape (rank, {host.in_features}, …), found {tuple(down.shape)}",
                keys=[f"{name}.lora_down.weight"],
            )
        rank = down.shape[0]
        tucker = mid is not None
        if tucker and host.kernel_numel == 1:
            expect_shape(name, "lora_mid.weight", mid, (rank, rank))  # a 1×1 core: fold it into up
        module = cls(host, rank, read_alpha(tensors, name, rank), use_tucker=tucker, **options)
        k, ones = host.kernel_size, host.ones
        down = expect_shape(name, "lora_down.weight", down, (rank, host.in_features, *(ones if module.tucker else k)))
        up = expect_shape(name, "lora_up.weight", up, (host.out_features, rank, *ones))
        if tucker and not module.tucker:
            up = (up.reshape(up.shape[0], rank).double() @ mid.reshape(rank, rank).double()).reshape(up.shape)
        with torch.no_grad():
            module.lora_down.weight.copy_(down)
            module.lora_up.weight.copy_(up)
            if module.tucker:
                module.lora_mid.weight.copy_(expect_shape(name, "lora_mid.weight", mid, (rank, rank, *k)))
        return module

    # ------------------------------------------------------------------ tools

    def factors(self) -> tuple[Tensor, Tensor]:
        """(γ·up, down) in float64; a Tucker core is folded into down."""
        up = self.with_scalar(self.lora_up.weight).detach().double().reshape(self.host.out_features, self.rank) * self.scale
        down = self.lora_down.weight.detach().double()
        if self.lora_mid is not None:
            down = torch.einsum("ij...,jq->iq...", self.lora_mid.weight.detach().double(), down.reshape(self.rank, -1))
        return up, down.reshape(self.rank, -1)

    @classmethod
    def file_weight_shape(cls, tensors: Mapping[str, Tensor]) -> tuple[tuple[int, ...], bool] | None:
        down, up, mid = (tensors.get(k) for k in ("lora_down.weight", "lora_up.weight", "lora_mid.weight"))
        if down is None or up is None or down.dim() < 2 or up.dim() < 1:
            return None
        if mid is not None:
            return (up.shape[0], down.shape[1], *mid.shape[2:]), True
        return (up.shape[0], *down.shape[1:]), True

    @classmethod
    def combine_native(cls, parts: Sequence[CombinePart], build: Callable[[Mapping[str, Tensor]], Any],
                       base: Any, dtype: torch.dtype) -> tuple[dict[str, Tensor], int | None]:
        """Ranks concatenated: each part's wᵢ·αᵢ/rᵢ folded into its `lora_up` rows, α = Σ rᵢ (scale 1),
        Tucker cores block-diagonal (mixed Tucker/plain: cores folded into `lora_down`). One part:
        its w folded into `lora_up`, rank and α kept."""
        if any("dora_scale" in tensors for _, tensors in parts):
            raise NotNative("DoRA is not linear in its factors")
        mods = [build(tensors) for _, tensors in parts]
        if len(parts) == 1:
            (w, tensors), mod = parts[0], mods[0]
            out = dict(tensors)
            out["lora_up.weight"] = (tensors["lora_up.weight"].double() * w).to(dtype).contiguous()
            return out, mod.rank
        ups, downs, mids = [], [], []
        tucker = all(m.lora_mid is not None for m in mods)
        for (w, _), mod in zip(parts, mods):
            up = mod.lora_up.weight.double() * (w * mod.scale)
            down = mod.lora_down.weight.double()
            if mod.lora_mid is not None and not tucker:  # fold the core: ΔW = up · (mid ×₂ down)
                mid = mod.lora_mid.weight.double()
                down = torch.einsum("ij...,jq->iq...", mid, down.reshape(down.shape[0], down.shape[1]))
            ups.append(up)
            downs.append(down)
            mids.append(None if mod.lora_mid is None else mod.lora_mid.weight.double())
        if len({tuple(d.shape[1:]) for d in downs}) != 1 or len({(u.shape[0], *u.shape[2:]) for u in ups}) != 1:
            raise IncompatibleFileError("the files' factor shapes do not fit one layer")
        rank = sum(d.shape[0] for d in downs)
        out = {"lora_up.weight": torch.cat(ups, 1).to(dtype).contiguous(),
               "lora_down.weight": torch.cat(downs, 0).to(dtype).contiguous(),
               "alpha": torch.tensor(float(rank), dtype=torch.float32)}
        if tucker:
            kernel = mids[0].shape[2:]
            core = torch.zeros(rank, rank, *kernel, dtype=torch.float64)
            at = 0
            for mid in mids:
                r = mid.shape[0]
                core[at:at + r, at:at + r] = mid
                at += r
            out["lora_mid.weight"] = core.to(dtype).contiguous()
        return out, rank
