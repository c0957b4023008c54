"""LoRA / LoCon: ΔW = γ·B·A, with an optional Tucker core for k>1 convolutions (LyCORIS App. B.2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeMismatchError
from ..hosts import HostLayer
from ..kernels.lowrank import lowrank_delta
from .base import RankedAdapter, expect_shape, read_alpha, require_keys
from .registry import register_algorithm


class Factor(nn.Module):
    """Holds one factor as `<name>.weight`, the key layout LyCORIS and kohya files use."""

    def __init__(self, tensor: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(tensor)


@register_algorithm("lora", aliases=("locon",))
class LoRA(RankedAdapter):
    """ΔW = (α/r)·up·down. `use_tucker` adds a core `lora_mid` (r, r, k…) for k>1 convs.

    `rs_lora` uses α/√r and stores α·√r in files so any reader recovers the same scale;
    `use_scalar` trains an extra scalar (init 0, `lora_up` random) folded into `lora_up` on save.
    """

    file_keys = frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale"})
    signature_keys = frozenset({"lora_down.weight", "lora_up.weight"})
    dropout_in_bypass = True

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
        """`lora_up` with the scalar folded in (as saved), then γ and an optional rank mask."""
        up = self.with_scalar(self.lora_up.weight) * self.scale
        if mask is not None:
            up = up * mask.view(1, -1, *([1] * (up.dim() - 2)))
        return up

    def adapter_delta(self, train: bool = False) -> Tensor:
        mid = self.lora_mid.weight if self.lora_mid is not None else None
        mask = self.rank_mask(self.rank, self.lora_up.weight) if train else None
        return lowrank_delta(self._up(mask), self.lora_down.weight, mid)

    def update_weight(self, acc: Tensor, multiplier: Tensor | None, train: bool = False, inplace: bool = False) -> Tensor:
        """W + m·γ·up·down as one `addmm` in merge precision: no full-size ΔW, and a merge writes
        straight into W (Tucker, DoRA and a non-contiguous W take the generic path)."""
        if self.lora_mid is not None or self.dora_scale is not None or not acc.is_contiguous():
            return super().update_weight(acc, multiplier, train, inplace)
        mask = self.rank_mask(self.rank, self.lora_up.weight) if train and self.training_now else None
        up = self._up(mask).reshape(acc.shape[0], self.rank).to(acc.dtype)
        if multiplier is not None:
            up = up * multiplier.to(acc.dtype)
        down = self.lora_down.weight.reshape(self.rank, -1).to(acc.dtype)
        flat = acc.view(acc.shape[0], -1)
        return (flat.addmm_(up, down) if inplace else torch.addmm(flat, up, down)).view(acc.shape)

    def merged_norm(self) -> Tensor:
        """Output-axis ‖W + ΔW‖ without building ΔW = U·D (the flattened factors): per row o,
        ‖W_o + ΔW_o‖² = ‖W_o‖² + 2·U_o·(W Dᵀ)_o + U_o (D Dᵀ) U_oᵀ — two reads of W, no full-size
        temporary (the rebuild path needs three full-size passes and their autograd)."""
        if self.tucker or not self.wd_on_out:
            return super().merged_norm()
        with torch.no_grad():
            weight = self.host.weight
            dtype = torch.promote_types(weight.dtype, torch.float32)
            w = weight.reshape(weight.shape[0], -1).to(dtype)
            up = self._up().reshape(w.shape[0], -1).to(dtype)
            down = self.lora_down.weight.reshape(up.shape[1], -1).to(dtype)
            base = torch.linalg.vector_norm(w, dim=1)
            change = 2 * (up * (w @ down.T)).sum(1) + ((up @ (down @ down.T)) * up).sum(1)
            # ‖W_o‖·√(1 + c/‖W_o‖²): exactly ‖W_o‖ when ΔW = 0, so DoRA is the identity at init.
            norm = torch.where(base > 0, base * (1 + change / base.square()).clamp_min(0).sqrt(), change.clamp_min(0).sqrt())
            return norm.reshape(self.dora_scale.shape)

    # ------------------------------------------------------------------ bypass

    @property
    def has_bypass(self) -> bool:
        return self.host.groups == 1

    def _down_path(self, x: Tensor) -> Tensor:
        """The rank-r activations: down (and the Tucker core) in the host's geometry, dropout on them."""
        host = self.host
        down = self.lora_down.weight.to(x.dtype)
        if self.lora_mid is not None:
            h = host.op(host.pointwise(x, down), self.lora_mid.weight.to(x.dtype), None)
        elif host.is_conv:
            h = host.op(x, down, None)
        else:
            h = F.linear(x, down)
        if self.dropout and self.training_now:
            h = F.dropout(h, self.dropout)
        return h

    def bypass(self, x: Tensor, base_out: Tensor) -> Tensor:
        h = self._down_path(x)
        mask = self.rank_mask(self.rank, h)
        return self.host.pointwise(h, self._up(mask).to(x.dtype))

    def add_output(self, out: Tensor, x: Tensor, base_out: Tensor) -> Tensor:
        """out + m·up(down(x)) as one fused matmul-add, the multiplier folded into the rank-sized
        up weight: no output-sized product, scaling or sum of its own (DoRA: the general path)."""
        if not self.can_bypass or self.dora_scale is not None or x.dtype != out.dtype:
            return super().add_output(out, x, base_out)
        h = self._down_path(x)
        up = self._up(self.rank_mask(self.rank, h)) * self.multiplier
        return self.host.pointwise_add(out, h, up.to(x.dtype))

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

    def adapter_tensors(self) -> dict[str, Tensor]:
        out = {
            "lora_down.weight": self.lora_down.weight.detach(),
            "lora_up.weight": self.with_scalar(self.lora_up.weight).detach(),
            "alpha": self.alpha_tensor(),
        }
        if self.lora_mid is not None:
            out["lora_mid.weight"] = self.lora_mid.weight.detach()
        return out

    @classmethod
    def adapter_from_tensors(cls, host: HostLayer, tensors: Mapping[str, Tensor], name: str, **options: Any) -> LoRA:
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
