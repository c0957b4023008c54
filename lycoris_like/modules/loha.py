"""LoHa: ΔW = γ·(W1a·W1b) ⊙ (W2a·W2b), rank up to r² at 2r(in+out) parameters (LyCORIS eq. 3;
FedPara), with an optional Tucker core per factor for k>1 convolutions (LyCORIS eq. 20)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ShapeMismatchError
from ..hosts import HostLayer
from ..kernels.hadamard import hadamard_add, hadamard_delta, hadamard_tucker_delta, khatri_rao_factors
from ..kernels.lowrank import lowrank_add
from .base import add_scaled
from .capabilities import Bypass, CombinePart, NativeCombine, WeightFree
from .files import expect_shape, read_alpha, require_keys
from .ranked import RankedAdapter
from .registry import register_algorithm

FACTOR_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@register_algorithm("loha")
class LoHa(Bypass, WeightFree, NativeCombine, RankedAdapter):
    """ΔW = (α/r)·(w1_a·w1_b) ⊙ (w2_a·w2_b), reshaped to the host weight (conv: out × in·k…).

    `use_tucker` (convs with kernel > 1): each factor is `t_i ×₁ w_i_a ×₂ w_i_b` with cores
    `hada_t1`, `hada_t2` (r, r, k…) and the flipped orientation w_i_a (r, out), w_i_b (r, in).
    `rs_lora` uses α/√r and stores α·√r; `use_scalar` trains a scalar (init 0, `hada_w2_a`
    random) that is folded into `hada_w1_a` on save.
    """

    file_keys = frozenset({*FACTOR_KEYS, "hada_t1", "hada_t2", "alpha"})
    signature_keys = frozenset({"hada_w1_a", "hada_w1_b"})

    def __init__(self, host: HostLayer, dim: int = 4, alpha: float | None = 1.0, **options: Any) -> None:
        super().__init__(host, dim, alpha, **options)
        rank = self.rank
        fac = self.factory()
        out, inp = host.out_features, host.in_features
        if self.tucker:
            a_shape, b_shape = (rank, out), (rank, inp)
            self.hada_t1 = nn.Parameter(torch.empty(rank, rank, *host.kernel_size, **fac))
            self.hada_t2 = nn.Parameter(torch.empty(rank, rank, *host.kernel_size, **fac))
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        else:
            a_shape, b_shape = (out, rank), (rank, inp * host.kernel_numel)
            self.hada_t1 = self.hada_t2 = None
        self.hada_w1_a = nn.Parameter(torch.empty(a_shape, **fac))
        self.hada_w1_b = nn.Parameter(torch.empty(b_shape, **fac))
        self.hada_w2_a = nn.Parameter(torch.empty(a_shape, **fac))
        self.hada_w2_b = nn.Parameter(torch.empty(b_shape, **fac))
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        if self.scalar is not None:  # the scalar (init 0) makes ΔW = 0; w2_a may then be random
            nn.init.normal_(self.hada_w2_a, std=0.1)
        else:
            nn.init.zeros_(self.hada_w2_a)  # (w2_a·w2_b) = 0 exactly, so ΔW = 0 exactly

    # ------------------------------------------------------------------ ΔW

    def _w1_a(self, mask: Tensor | None = None) -> Tensor:
        """`hada_w1_a` with the scalar folded in (as saved) and an optional output-row mask."""
        a = self.with_scalar(self.hada_w1_a)
        if mask is not None:  # masking rows of one factor masks the rows of ΔW
            a = a * (mask.view(1, -1) if self.tucker else mask.view(-1, 1))
        return a

    def delta_weight(self, train: bool = False) -> Tensor:
        mask = self.rank_mask(self.host.out_features, self.hada_w1_a) if train else None
        a1 = self._w1_a(mask)
        if self.tucker:
            return hadamard_tucker_delta(
                self.hada_t1, a1, self.hada_w1_b, self.hada_t2, self.hada_w2_a, self.hada_w2_b, self.scale
            )
        delta = hadamard_delta(a1, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)
        return delta.reshape(self.host.weight.shape)

    def add_delta(self, acc: Tensor, multiplier: float | Tensor, train: bool = False, inplace: bool = False) -> Tensor:
        """W + m·γ·(w1_a·w1_b) ⊙ (w2_a·w2_b) as one addcmul with m·γ its value (`kernels.hadamard`);
        Tucker and a tensor multiplier take the generic path, a merge the in-place one."""
        if self.tucker or isinstance(multiplier, Tensor):
            return add_scaled(acc, LoHa.delta_weight(self, train), multiplier, inplace)  # this algorithm's ΔW, also under DoRA
        mask = self.rank_mask(self.host.out_features, self.hada_w1_a) if train else None
        return hadamard_add(acc, self._w1_a(mask), self.hada_w1_b, self.hada_w2_a, self.hada_w2_b,
                            multiplier * self.scale, inplace)

    # ------------------------------------------------------------------ bypass

    def fast_path(self, train: bool) -> str | None:
        return "bypass" if self.host.groups == 1 and not self.tucker else None

    def _khatri_rao(self) -> tuple[Tensor, Tensor]:
        """(up (out, r²), down (r², in, k…)): (B₁A₁)⊙(B₂A₂) = (B₁ ⊙_KR B₂)(A₁ ⊙_KR A₂)."""
        host = self.host
        up, down = khatri_rao_factors(self._w1_a(), self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)
        return up, down.reshape(down.shape[0], host.in_features, *host.kernel_size)

    def bypass(self, x: Tensor, train: bool = False) -> Tensor:
        """A rank-r² down (in the host's geometry), then up."""
        host = self.host
        up, down = self._khatri_rao()
        h = host.op(x, down.to(x.dtype), None)
        mask = self.rank_mask(host.out_features, h) if train else None
        up = up * self.scale if mask is None else up * self.scale * mask.view(-1, 1)
        return host.pointwise(h, up.reshape(host.out_features, -1, *host.ones).to(x.dtype))

    def bypass_add(self, out: Tensor, x: Tensor, multiplier: float | Tensor, train: bool = False,
                   row_scale: Tensor | None = None) -> Tensor:
        """out + m·γ·up(down(x)) on the Khatri-Rao factors by `kernels.lowrank.lowrank_add`."""
        if isinstance(multiplier, Tensor) or (train and self.rank_dropout):
            return super().bypass_add(out, x, multiplier, train, row_scale)
        up, down = self._khatri_rao()
        if row_scale is not None:
            up = up * row_scale.reshape(-1, 1).to(up.dtype)
        dtype, host = out.dtype, self.host
        h = host.op(x.to(dtype), down.to(dtype), None)
        return lowrank_add(out, h, up.to(dtype), multiplier * self.scale, len(host.kernel_size))

    def rebuild_flops(self) -> int:
        host = self.host
        out, inp, k, r = host.out_features, host.in_features, host.kernel_numel, self.rank
        if self.tucker:
            factor = r * r * inp * k + r * out * inp * k
        else:
            factor = r * out * inp * k
        return 2 * factor + out * inp * k

    def bypass_flops(self, tokens: int) -> int:
        host = self.host
        width = host.in_features * host.kernel_numel + host.out_features
        return (tokens + 1) * self.rank * self.rank * width  # + 1: building the Khatri-Rao factors

    # ------------------------------------------------------------------ files

    def file_tensors(self) -> dict[str, Tensor]:
        out = {
            "hada_w1_a": self._w1_a().detach(),
            "hada_w1_b": self.hada_w1_b.detach(),
            "hada_w2_a": self.hada_w2_a.detach(),
            "hada_w2_b": self.hada_w2_b.detach(),
            "alpha": self.alpha_tensor(),
        }
        if self.tucker:
            out["hada_t1"] = self.hada_t1.detach()
            out["hada_t2"] = self.hada_t2.detach()
        return out

    @classmethod
    def from_file_tensors(cls, host: HostLayer, tensors: Mapping[str, Tensor], name: str, **options: Any) -> LoHa:
        require_keys(tensors, name, FACTOR_KEYS)
        has_t1, has_t2 = "hada_t1" in tensors, "hada_t2" in tensors
        if has_t1 or has_t2:
            require_keys(tensors, name, ("hada_t1", "hada_t2"))
        tucker = has_t1
        b1 = tensors["hada_w1_b"]
        if b1.dim() < 2 or b1.shape[0] == 0:
            raise ShapeMismatchError(
                f"{name}.hada_w1_b: expected shape (rank, {host.in_features * host.kernel_numel}), "
                f"found {tuple(b1.shape)}",
                keys=[f"{name}.hada_w1_b"],
            )
        rank = b1.shape[0]
        out, inp, k = host.out_features, host.in_features, host.kernel_size
        alpha = read_alpha(tensors, name, rank)
        if tucker and host.kernel_numel > 1:
            module = cls(host, rank, alpha, use_tucker=True, **options)
            shapes = {"hada_t1": (rank, rank, *k), "hada_t2": (rank, rank, *k),
                      "hada_w1_a": (rank, out), "hada_w2_a": (rank, out),
                      "hada_w1_b": (rank, inp), "hada_w2_b": (rank, inp)}
            values = {key: expect_shape(name, key, tensors[key], shape) for key, shape in shapes.items()}
        elif tucker:
            # A 1×1 core on a pointwise host: fold it into `a` (F = aᵀ·t·b), no core needed.
            module = cls(host, rank, alpha, **options)
            values = {}
            for i in ("1", "2"):
                t = expect_shape(name, f"hada_t{i}", tensors[f"hada_t{i}"], (rank, rank)).double()
                a = expect_shape(name, f"hada_w{i}_a", tensors[f"hada_w{i}_a"], (rank, out)).double()
                values[f"hada_w{i}_a"] = a.T @ t
                values[f"hada_w{i}_b"] = expect_shape(name, f"hada_w{i}_b", tensors[f"hada_w{i}_b"], (rank, inp))
        else:
            module = cls(host, rank, alpha, **options)
            flat = inp * host.kernel_numel
            values = {}
            for key in FACTOR_KEYS:
                tensor = tensors[key]
                if key.endswith("_b") and k and tuple(tensor.shape) == (rank, inp, *k):
                    tensor = tensor.reshape(rank, flat)  # an unflattened conv layout
                values[key] = expect_shape(name, key, tensor, (out, rank) if key.endswith("_a") else (rank, flat))
        with torch.no_grad():
            for key, value in values.items():
                getattr(module, key).copy_(value)
        return module

    # ------------------------------------------------------------------ tools

    @classmethod
    def file_weight_shape(cls, tensors: Mapping[str, Tensor]) -> tuple[tuple[int, ...], bool] | None:
        """Tucker files say the kernel; plain conv factors are stored flattened (out, in·k…): a guess."""
        a, b, t = tensors.get("hada_w1_a"), tensors.get("hada_w1_b"), tensors.get("hada_t1")
        if a is None or b is None or a.dim() < 2 or b.dim() < 2:
            return None
        if t is not None:
            return (a.shape[1], b.shape[1], *t.shape[2:]), True
        return (a.shape[0], *b.shape[1:]), b.dim() > 2

    @classmethod
    def combine_native(cls, parts: Sequence[CombinePart], build: Callable[[Mapping[str, Tensor]], Any],
                       base: Any, dtype: torch.dtype) -> tuple[dict[str, Tensor], int | None]:
        """One file only: w folded into `hada_w1_a` (a sum of Hadamard products is not one of the same rank)."""
        return cls.fold_single(parts, ("hada_w1_a",), dtype)

