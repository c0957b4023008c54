"""LoKr: ΔW = γ·W1 ⊗ W2 with LyCORIS's factorisation (LyCORIS paper eq. 4–5, App. B.3; KronA).

W1 (a, c) holds the small factors, W2 (b, d[, k…]) the large ones and the kernel; out = a·b,
in = c·d. W2 is full or low-rank (optionally Tucker on k>1 convs), W1 full or (with
`decompose_both`) low-rank. The bypass applies W1 · unvec(x) · W2ᵀ without ever building ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleFileError, ShapeMismatchError
from ..hosts import HostLayer
from ..kernels.lowrank import lowrank_add
from ..kernels.kronecker import (
    FACTORIZATIONS,
    factorization,
    kron_add,
    kron_conv_bypass,
    kron_delta,
    kron_linear_bypass,
    lowrank_w2,
    tucker_w2,
)
from .base import add_scaled
from .capabilities import Bypass, CombinePart, NativeCombine, WeightFree
from .files import expect_shape, float32_exact, merge_ratio, read_alpha, require_keys
from .ranked import RankedAdapter
from .registry import register_algorithm

PARAM_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass(frozen=True)
class KronLayout:
    """The factor shapes of one LoKr adapter: W1 (a, c), W2 (b, d, *kernel).

    `w1_rank`/`w2_rank` are None for a full factor; `tucker` means W2 = t2 ×₁ w2_a ×₂ w2_b.
    """

    a: int
    b: int
    c: int
    d: int
    kernel: tuple[int, ...]
    w1_rank: int | None
    w2_rank: int | None
    tucker: bool

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel)

    @property
    def scale_rank(self) -> int | None:
        """The rank consumers divide α by: W2's if decomposed, else W1's; None when both are full."""
        return self.w2_rank if self.w2_rank is not None else self.w1_rank

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter (= file) shapes, keyed by LyCORIS suffix."""
        a, b, c, d, k = self.a, self.b, self.c, self.d, self.kernel
        out: dict[str, tuple[int, ...]] = {}
        if self.w1_rank is None:
            out["lokr_w1"] = (a, c)
        else:
            out["lokr_w1_a"] = (a, self.w1_rank)
            out["lokr_w1_b"] = (self.w1_rank, c)
        r = self.w2_rank
        if r is None:
            out["lokr_w2"] = (b, d, *k)
        elif self.tucker:
            out["lokr_t2"] = (r, r, *k)
            out["lokr_w2_a"] = (r, b)
            out["lokr_w2_b"] = (r, d)
        else:
            out["lokr_w2_a"] = (b, r)
            out["lokr_w2_b"] = (r, d * self.kernel_numel)
        return out


def layout_for(
    host: HostLayer,
    dim: int,
    factor: int = -1,
    *,
    decompose_both: bool = False,
    full_matrix: bool = False,
    unbalanced_factorization: bool = False,
    use_tucker: bool = False,
    rule: str = "lycoris",
) -> KronLayout:
    """LyCORIS's layout rule for a new adapter (see FORMATS.md §2), with the factorisation `rule`."""
    in_m, in_n = factorization(host.in_features, factor, rule)
    out_l, out_k = factorization(host.out_features, factor, rule)
    if unbalanced_factorization:
        out_l, out_k = out_k, out_l
    a, c, b, d = out_l, in_m, out_k, in_n
    w1_rank = dim if decompose_both and not full_matrix and dim < max(a, c) / 2 else None
    w2_rank = None if full_matrix or dim >= max(b, d) / 2 else dim
    tucker = bool(use_tucker) and w2_rank is not None and host.kernel_numel > 1
    return KronLayout(a, b, c, d, host.kernel_size, w1_rank, w2_rank, tucker)


@register_algorithm("lokr", aliases=("kron",))
class LoKr(Bypass, WeightFree, NativeCombine, RankedAdapter):
    """ΔW = γ·W1 ⊗ W2, γ = α/r (r of the decomposed half; γ = 1 when both halves are full).

    Options (LyCORIS names): `factor` bounds the small factor (−1: closest to √n), `factorization`
    picks the rule ("lycoris", the default and what lycoris-lora's files follow, or "paper": eq. 5),
    `decompose_both` makes W1 low-rank too, `full_matrix` keeps W2 full whatever `dim`,
    `unbalanced_factorization` gives W1 the larger output factor, `use_tucker` puts a core on
    k>1 convs, `rs_lora` uses α/√r, `use_scalar` trains a scalar (init 0) folded into W1 on save.
    """

    file_keys = frozenset({*PARAM_NAMES, "alpha"})
    signature_keys = frozenset({"lokr_w1", "lokr_w1_a"})

    def __init__(
        self,
        host: HostLayer,
        dim: int = 4,
        alpha: float | None = 1.0,
        *,
        factor: int = -1,
        decompose_both: bool = False,
        full_matrix: bool = False,
        unbalanced_factorization: bool = False,
        factorization: str = "lycoris",
        use_tucker: bool = False,
        rs_lora: bool = False,
        use_scalar: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(host, dim, alpha, use_tucker=use_tucker, rs_lora=rs_lora, use_scalar=use_scalar, **common)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor == 0:
            raise ConfigError(f"factor must be a positive integer or -1, got {factor!r}")
        if factorization not in FACTORIZATIONS:
            raise ConfigError(f"factorization must be one of {FACTORIZATIONS}, got {factorization!r}")
        self.factor: int | None = factor
        self.factorization: str | None = factorization
        self.unbalanced_factorization = bool(unbalanced_factorization)
        layout = layout_for(
            host, self.rank, factor, decompose_both=bool(decompose_both), full_matrix=bool(full_matrix),
            unbalanced_factorization=self.unbalanced_factorization, use_tucker=bool(use_tucker), rule=factorization,
        )
        # Both halves full: LyCORIS uses scale 1 and writes alpha = dim.
        self._install(layout, self.rank if layout.scale_rank is None else alpha)

    # ------------------------------------------------------------------ layout and parameters

    def _install(self, layout: KronLayout, alpha: float | None) -> None:
        """(Re)create the parameters for `layout` with LyCORIS's init (identity: W2's last factor
        is 0, or the scalar is) and set α, γ."""
        self.layout = layout
        self.tucker = layout.tucker
        shapes = layout.shapes()
        fac = self.factory()
        for key in PARAM_NAMES:
            setattr(self, key, nn.Parameter(torch.empty(shapes[key], **fac)) if key in shapes else None)
        zero_last = self.scalar is None
        for key in shapes:
            p = getattr(self, key)
            if zero_last and key in ("lokr_w2", "lokr_w2_b"):
                nn.init.zeros_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        rank = layout.scale_rank
        if rank is None:
            self.alpha, self.scale = float32_exact(float(alpha or self.rank)), 1.0
        else:
            self.alpha, self.scale = merge_ratio(alpha, rank, self.rs_lora)

    # ------------------------------------------------------------------ ΔW

    def _w1(self) -> Tensor:
        """W1 (a, c) with the scalar folded in where it is saved (lokr_w1 / lokr_w1_a), then γ."""
        first = self.with_scalar(self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a)
        w1 = first if self.lokr_w1 is not None else first @ self.lokr_w1_b
        return w1 * self.scale

    def _w2(self) -> Tensor:
        """W2 (b, d, k…)."""
        if self.lokr_w2 is not None:
            return self.lokr_w2
        if self.lokr_t2 is not None:
            return tucker_w2(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return lowrank_w2(self.lokr_w2_a, self.lokr_w2_b, self.layout.kernel)

    def delta_weight(self, train: bool = False) -> Tensor:
        delta = kron_delta(self._w1(), self._w2())
        mask = self.rank_mask(delta.shape[0], delta) if train else None
        if mask is not None:
            delta = delta * mask.view(-1, *([1] * (delta.dim() - 1)))
        return delta

    def add_delta(self, acc: Tensor, multiplier: float | Tensor, train: bool = False, inplace: bool = False) -> Tensor:
        """W + m·W1 ⊗ W2 as one addcmul of broadcast views (`kernels.kronecker.kron_add`), m·γ its
        value; rank dropout, a tensor multiplier and a non-contiguous W take the generic path."""
        if isinstance(multiplier, Tensor) or (train and self.rank_dropout) or not acc.is_contiguous():
            return add_scaled(acc, LoKr.delta_weight(self, train), multiplier, inplace)  # this algorithm's ΔW, also under DoRA
        first = self.with_scalar(self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a)
        w1 = first if self.lokr_w1 is not None else first @ self.lokr_w1_b
        return kron_add(acc, w1, self._w2(), multiplier * self.scale, inplace)

    # ------------------------------------------------------------------ bypass

    def fast_path(self, train: bool) -> str | None:
        return "bypass" if self.host.groups == 1 else None

    def _grouped_down(self, x: Tensor) -> Tensor:
        """The rank activations of a low-rank W2: w2_b (and the Tucker core) applied to each of the
        c input groups of x in the host's geometry, the groups then side by side as c·r channels."""
        host, layout = self.host, self.layout
        c, d, r = layout.c, layout.d, layout.w2_rank
        w2_b = self.lokr_w2_b.to(x.dtype)
        if not host.is_conv:
            h = x.reshape(*x.shape[:-1], c, d) @ w2_b.T  # (…, c, r)
            return h.reshape(*x.shape[:-1], c * r)
        spatial = len(layout.kernel)
        batch = x.unsqueeze(0) if x.dim() == spatial + 1 else x
        groups = batch.reshape(batch.shape[0] * c, d, *batch.shape[2:])
        if self.lokr_t2 is not None:
            h = host.op(host.pointwise(groups, w2_b), self.lokr_t2.to(x.dtype), None)
        else:
            h = host.op(groups, w2_b.reshape(r, d, *layout.kernel), None)
        h = h.reshape(batch.shape[0], c * r, *h.shape[2:])
        return h[0] if batch is not x else h

    def _kron_up(self) -> Tensor:
        """kron(W1, w2_a) (a·b, c·r), γ not applied: ΔW = γ·kron(W1, w2_a)·kron(I_c, w2_b), a
        LoRA whose down is `_grouped_down`."""
        w1 = self.with_scalar(self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a)
        if self.lokr_w1 is None:
            w1 = w1 @ self.lokr_w1_b
        w2_a = self.lokr_w2_a.T if self.lokr_t2 is not None else self.lokr_w2_a  # (b, r)
        (a, c), (b, r) = w1.shape, w2_a.shape
        return (w1.reshape(a, 1, c, 1) * w2_a.reshape(1, b, 1, r)).reshape(a * b, c * r)

    def bypass(self, x: Tensor, train: bool = False) -> Tensor:
        host = self.host
        if self.lokr_w2 is None:  # low-rank W2: the Kronecker up after the grouped down
            h = self._grouped_down(x)
            up = self._kron_up().to(x.dtype) * self.scale
            mask = self.rank_mask(host.out_features, up) if train else None
            if mask is not None:
                up = up * mask.view(-1, 1)
            return host.pointwise(h, up.reshape(host.out_features, -1, *host.ones))
        w1 = self._w1().to(x.dtype)
        w2 = self.lokr_w2.to(x.dtype)
        if not host.is_conv:
            y = kron_linear_bypass(x, w1, lambda h: h @ w2.T)
        else:
            y = kron_conv_bypass(x, w1, lambda h: host.op(h, w2, None), len(self.layout.kernel))
        mask = self.rank_mask(host.out_features, y) if train else None
        if mask is not None:
            y = y * (mask if not host.is_conv else mask.view(-1, *host.ones))
        return y

    def bypass_add(self, out: Tensor, x: Tensor, multiplier: float | Tensor, train: bool = False,
                   row_scale: Tensor | None = None) -> Tensor:
        """A low-rank W2 as out + m·γ·kron(W1, w2_a)·h by `kernels.lowrank.lowrank_add`, h the
        grouped down; a full W2, a tensor multiplier and training-time dropout: the generic path."""
        if (self.lokr_w2 is not None or isinstance(multiplier, Tensor)
                or (train and (self.dropout or self.rank_dropout))):
            return super().bypass_add(out, x, multiplier, train, row_scale)
        dtype = out.dtype
        up = self._kron_up()
        if row_scale is not None:
            up = up * row_scale.reshape(-1, 1).to(up.dtype)
        h = self._grouped_down(x.to(dtype))
        return lowrank_add(out, h, up.to(dtype), multiplier * self.scale, len(self.host.kernel_size))

    def _w1_flops(self) -> int:
        layout = self.layout
        return 0 if layout.w1_rank is None else layout.a * layout.c * layout.w1_rank

    def rebuild_flops(self) -> int:
        layout = self.layout
        b, d, k, r = layout.b, layout.d, layout.kernel_numel, layout.w2_rank
        w2 = 0 if r is None else (r * r * k * d + r * b * d * k if layout.tucker else b * r * d * k)
        return self._w1_flops() + w2 + self.host.weight.numel()

    def bypass_flops(self, tokens: int) -> int:
        """Per output position: W2's down part on each of the c groups, then (low rank) the
        Kronecker up (a·b × c·r) it builds once, or (full W2) W1's mixing of the groups."""
        layout = self.layout
        a, b, c, d, k, r = layout.a, layout.b, layout.c, layout.d, layout.kernel_numel, layout.w2_rank
        if r is None:
            return tokens * (c * b * d * k + a * c * b) + self._w1_flops()
        down = r * d + r * r * k if layout.tucker else r * d * k
        return tokens * (c * down + a * b * c * r) + a * b * c * r + self._w1_flops()

    # ------------------------------------------------------------------ files

    def file_tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for key in PARAM_NAMES:
            p = getattr(self, key)
            if p is None:
                continue
            out[key] = (self.with_scalar(p) if key in ("lokr_w1", "lokr_w1_a") else p).detach()
        out["alpha"] = self.alpha_tensor()
        return out

    @classmethod
    def from_file_tensors(cls, host: HostLayer, tensors: Mapping[str, Tensor], name: str, **options: Any) -> LoKr:
        layout, values = _read_layout(host, tensors, name)
        rank = layout.scale_rank
        alpha = read_alpha(tensors, name, rank if rank is not None else 1)
        if rank is not None:
            dim = rank
        else:  # both halves full: the rank only names the file; LyCORIS writes alpha = dim
            dim = int(alpha) if float(alpha).is_integer() and alpha >= 1 else 1
        module = cls(host, dim, alpha, use_tucker=layout.tucker, **options)
        module._install(layout, alpha)
        module.factor = module.factorization = None  # the file's shapes, not a factor, define the layout
        with torch.no_grad():
            for key, value in values.items():
                getattr(module, key).copy_(value)
            if module.scalar is not None:
                module.scalar.fill_(1.0)
        return module

    @classmethod
    def file_weight_shape(cls, tensors: Mapping[str, Tensor]) -> tuple[tuple[int, ...], bool] | None:
        """Full and Tucker W2 say the kernel; a low-rank conv W2 is stored flattened: a guess."""
        g = {k: tuple(v.shape) for k, v in tensors.items()}
        try:
            a, c = (g["lokr_w1"] if "lokr_w1" in g else (g["lokr_w1_a"][0], g["lokr_w1_b"][1]))[:2]
            if "lokr_w2" in g:
                w2 = g["lokr_w2"]
                return (a * w2[0], c * w2[1], *w2[2:]), True
            if "lokr_t2" in g:
                return (a * g["lokr_w2_a"][1], c * g["lokr_w2_b"][1], *g["lokr_t2"][2:]), True
            return (a * g["lokr_w2_a"][0], c * g["lokr_w2_b"][1]), False
        except (KeyError, IndexError):
            return None

    @classmethod
    def combine_native(cls, parts: Sequence[CombinePart], build: Callable[[Mapping[str, Tensor]], Any],
                       base: Any, dtype: torch.dtype) -> tuple[dict[str, Tensor], int | None]:
        """One file only: w folded into W1 (a sum of Kronecker products is not one of the same rank)."""
        return cls.fold_single(parts, ("lokr_w1", "lokr_w1_a"), dtype)

    def config(self) -> dict[str, Any]:
        layout = self.layout
        return {
            **super().config(),
            "factor": self.factor,
            "factorization": self.factorization,
            "decompose_both": layout.w1_rank is not None,
            "full_matrix": layout.w2_rank is None,
            "unbalanced_factorization": self.unbalanced_factorization,
            "w1_shape": [layout.a, layout.c],
            "w2_shape": [layout.b, layout.d, *layout.kernel],
        }


# --------------------------------------------------------------------- reading a file's layout


def _dims(name: str, key: str, tensor: Tensor, what: str) -> tuple[int, int]:
    """The first two sizes of a factor, which must be at least 2-D and non-empty."""
    if tensor.dim() < 2 or tensor.numel() == 0:
        raise ShapeMismatchError(
            f"{name}.{key}: expected a non-empty {what} matrix, found shape {tuple(tensor.shape)}",
            keys=[f"{name}.{key}"],
        )
    return tensor.shape[0], tensor.shape[1]


def _either(tensors: Mapping[str, Tensor], name: str, full: str, pair: tuple[str, str]) -> bool:
    """True for the full key, False for the decomposed pair; typed errors for both or neither."""
    present = [k for k in (full, *pair) if k in tensors]
    if full in tensors and len(present) > 1:
        keys = [f"{name}.{k}" for k in present]
        raise IncompatibleFileError(f"{name}: holds both {full} and {'/'.join(pair)}; expected one of them", keys=keys)
    if full in tensors:
        return True
    if not present:
        keys = [f"{name}.{full}"]
        raise IncompatibleFileError(f"missing {name}.{full} (or {name}.{pair[0]} + {name}.{pair[1]})", keys=keys)
    require_keys(tensors, name, pair)
    return False


def _read_layout(host: HostLayer, tensors: Mapping[str, Tensor], name: str) -> tuple[KronLayout, dict[str, Tensor]]:
    """The layout the file's factor shapes describe, validated against the host, and the tensors
    reshaped to the parameters' shapes (a 1×1 Tucker core is folded into w2_a/w2_b)."""
    kernel, knum = host.kernel_size, host.kernel_numel
    w1_full = _either(tensors, name, "lokr_w1", ("lokr_w1_a", "lokr_w1_b"))
    w2_full = _either(tensors, name, "lokr_w2", ("lokr_w2_a", "lokr_w2_b"))
    tucker = "lokr_t2" in tensors
    if tucker and w2_full:
        raise IncompatibleFileError(f"{name}.lokr_t2: a Tucker core needs lokr_w2_a/lokr_w2_b, not lokr_w2",
                                    keys=[f"{name}.lokr_t2"])

    if w1_full:
        a, c = _dims(name, "lokr_w1", tensors["lokr_w1"], "(a, c)")
        w1_rank, w1_keys = None, ["lokr_w1"]
    else:
        a, w1_rank = _dims(name, "lokr_w1_a", tensors["lokr_w1_a"], "(a, rank)")
        c = _dims(name, "lokr_w1_b", tensors["lokr_w1_b"], "(rank, c)")[1]
        w1_keys = ["lokr_w1_a", "lokr_w1_b"]
    if w2_full:
        b, d = _dims(name, "lokr_w2", tensors["lokr_w2"], "(b, d, k…)")
        w2_rank, w2_keys = None, ["lokr_w2"]
    elif tucker:
        w2_rank, b = _dims(name, "lokr_w2_a", tensors["lokr_w2_a"], "(rank, b)")
        d = _dims(name, "lokr_w2_b", tensors["lokr_w2_b"], "(rank, d)")[1]
        w2_keys = ["lokr_t2", "lokr_w2_a", "lokr_w2_b"]
    else:
        b, w2_rank = _dims(name, "lokr_w2_a", tensors["lokr_w2_a"], "(b, rank)")
        w2_b = tensors["lokr_w2_b"]
        flat = _dims(name, "lokr_w2_b", w2_b, "(rank, d·k…)")[1]
        d = flat if w2_b.dim() > 2 else flat // knum
        if w2_b.dim() == 2 and flat % knum:
            raise ShapeMismatchError(
                f"{name}.lokr_w2_b: second size {flat} is not a multiple of the kernel size {knum}",
                keys=[f"{name}.lokr_w2_b"],
            )
        w2_keys = ["lokr_w2_a", "lokr_w2_b"]
    if (a * b, c * d) != (host.out_features, host.in_features):
        keys = [f"{name}.{k}" for k in w1_keys + w2_keys]
        raise ShapeMismatchError(
            f"{name}: W1 ({a}, {c}) ⊗ W2 ({b}, {d}, …) gives a ({a * b}, {c * d}, …) weight, "
            f"but the layer's weight is {tuple(host.weight.shape)}",
            keys=keys,
        )

    fold_core = tucker and knum == 1
    layout = KronLayout(a, b, c, d, kernel, w1_rank, w2_rank, tucker and not fold_core)
    values: dict[str, Tensor] = {}
    if fold_core:  # a 1×1 core is a plain low-rank W2: w2_a' = w2_aᵀ, w2_b' = core · w2_b
        r = w2_rank
        core = expect_shape(name, "lokr_t2", tensors["lokr_t2"], (r, r, *kernel)).reshape(r, r)
        w2_a = expect_shape(name, "lokr_w2_a", tensors["lokr_w2_a"], (r, b))
        w2_b = expect_shape(name, "lokr_w2_b", tensors["lokr_w2_b"], (r, d))
        values["lokr_w2_a"] = w2_a.T
        values["lokr_w2_b"] = core.double() @ w2_b.double()
        shapes = {k: v for k, v in layout.shapes().items() if k not in values}
    else:
        shapes = layout.shapes()
    for key, shape in shapes.items():
        tensor = tensors[key]
        if key == "lokr_w2_b" and not layout.tucker and tensor.dim() > 2:
            tensor = expect_shape(name, key, tensor, (w2_rank, d, *kernel)).reshape(shape)
        values[key] = expect_shape(name, key, tensor, shape)
    return layout, values
