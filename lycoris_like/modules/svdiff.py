"""SVDiff: spectral shifts (Han et al. 2023, §3.2). Only a shift δ per singular value is trained.

Host weight W (flattened out × in·k…) = U·diag(σ)·Vh, computed once per layer in float64 from the
host's weight (tall orientation). W' = U·diag(ReLU(σ + s·δ))·Vh, so

    ΔW(s) = U·diag(ReLU(σ + s·δ) − σ)·Vh,

with the runtime multiplier s **inside** the ReLU (`add_delta` and the forward paths put it there): s = 0 gives the
base exactly, δ = 0 gives ΔW = 0 exactly, and `delta_weight()` is ΔW(1). Norm layers follow
`one_d`: "scalar" (svdiff-pytorch: one δ per layer, γ' = ReLU(‖γ‖ + s·δ)·γ/‖γ‖ — the same
formula on γ seen as a 1 × C matrix), "direct" (the paper: a shift of γ's own shape, Δγ = s·δ),
or "none". Biases are never trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleFileError, ShapeMismatchError
from ..hosts import LINEAR_AND_CONV, NORMS, HostLayer, compute_dtype
from ..kernels.spectral import (
    as_matrix,
    gram_svd,
    lean_delta,
    lean_split,
    spectral_delta,
    spectral_gain,
    tall_svd,
    weight_checksum,
)
from .base import AdapterModule
from .capabilities import (
    Bypass,
    CombinePart,
    InputMap,
    NativeCombine,
    NonlinearMultiplier,
    NotNative,
    OutputMap,
    ReadsHostWeight,
)
from .files import require_keys
from .registry import register_algorithm

ONE_D_MODES = ("scalar", "direct", "none")
SVD_BUFFERS = ("compact", "float32", "float64", "lean")
DEFAULT_SVD_BUFFERS = "compact"
DEFAULT_ONE_D = "scalar"
LEAN_RTOL = 1e-6  # float64 factors: divide by singular values down to 1e-6·σ_max
LR_SHIFTS = 1e-3
LR_ONE_D = 1e-6


def check_one_d(value: Any) -> str:
    if value not in ONE_D_MODES:
        raise ConfigError(f"one_d must be one of {ONE_D_MODES}, got {value!r}")
    return value


@register_algorithm("svdiff")
class SVDiff(OutputMap, InputMap, Bypass, NonlinearMultiplier, ReadsHostWeight, NativeCombine, AdapterModule):
    """Spectral shifts on Linear, Conv1d/2d/3d, Embedding and (per `one_d`) LayerNorm/GroupNorm.

    Options: `one_d` ("scalar" default, "direct", "none"); `svd_buffers` — what is kept per layer:
    "compact" (default: σ and the smaller singular factor in float32; the forward goes through the
    host's own output or input, see `side`, and rebuilds recover the larger factor from the host
    weight — 4.9× less memory than "float32" on the SD1.5 UNet; the host weight must still be the
    base), "float32" (U, σ, Vh in float32), "float64" (the same in float64), or "lean" (as compact,
    in float64, rebuild only). `dim`/`alpha` are accepted and ignored. `dropout` acts on the r
    spectral activations (x·Vhᵀ) in the bypass; `rank_dropout` drops whole singular components
    (norm "direct": entries of δ).
    """

    restorable_options = frozenset({"svd_buffers"})

    host_kinds = LINEAR_AND_CONV | NORMS | frozenset({"embedding"})
    file_keys = frozenset({"delta", "gain_delta", "base_hash"})
    signature_keys = frozenset({"delta", "gain_delta"})
    bypass_dropout = True

    def __init__(
        self,
        host: HostLayer,
        dim: int = 1,
        alpha: float | None = None,
        *,
        one_d: str = DEFAULT_ONE_D,
        svd_buffers: str = DEFAULT_SVD_BUFFERS,
        **common: Any,
    ) -> None:
        super().__init__(host, **common)
        self.one_d = check_one_d(one_d)
        if svd_buffers not in SVD_BUFFERS:
            raise ConfigError(f"svd_buffers must be one of {SVD_BUFFERS}, got {svd_buffers!r}")
        self.svd_buffers = svd_buffers
        self.is_norm = host.kind in NORMS
        if self.is_norm and self.one_d == "none":
            raise ConfigError(f"svdiff with one_d='none' does not adapt {host.kind} layers")
        self.direct = self.is_norm and self.one_d == "direct"
        # compact/lean: keep σ and the smaller factor, recover the larger from the host weight
        self.recovers = svd_buffers in ("compact", "lean") and not self.is_norm  # a 1 × C factor is tiny
        self.side: str | None = None
        weight = host.weight.detach()
        # The base this adapter is defined on (written to files, verified at load).
        self.base_hash = weight_checksum(weight, compute_dtype(weight.dtype))
        fac = self.factory()
        if self.direct:
            self.rank = weight.numel()
            self.gain_delta = nn.Parameter(torch.zeros(weight.shape, **fac))
            self.delta = None
            return
        matrix = as_matrix(weight)
        self.tall = matrix.shape[0] > matrix.shape[1]  # square: U is the small factor
        self.rank = min(matrix.shape)
        self.gain_delta = None
        self.delta = nn.Parameter(torch.zeros(self.rank, **fac))
        keep = torch.float32 if svd_buffers in ("compact", "float32") else torch.float64
        keep = torch.promote_types(keep, compute_dtype(weight.dtype))
        for name in ("S", "U", "Vh", "small", "tail"):
            self.register_buffer(name, None, persistent=False)
        with torch.no_grad():
            if self.recovers:
                self.init_small_factor(matrix, keep)
                return
            u, s, vh = tall_svd(matrix, torch.float64)
        self.S, self.U, self.Vh = s.to(keep), u.to(keep), vh.to(keep)

    def init_small_factor(self, matrix: Tensor, keep: torch.dtype) -> None:
        """σ and the small square factor (compact, lean); the large factor is W·Vhᵀ/σ (tall) or
        Uᵀ·W/σ (wide), except for singular values too small to divide by, whose large-factor vectors
        are kept in `tail`. Float32 compact buffers come from the Gram matrix's eigendecomposition
        (float64; no large factor formed), unless it finds such small singular values."""
        rtol = LEAN_RTOL if self.svd_buffers == "lean" else torch.finfo(keep).eps ** 0.5
        if keep != torch.float64:  # compact on a float32/16 host
            s, small = gram_svd(matrix, torch.float64)
            if lean_split(s, rtol) == 0:
                self.head = self.rank
                self.S, self.small = s.to(keep), small.to(keep)
                self.side = side_of(self.host, self.tall, 0)
                return
        u, s, vh = tall_svd(matrix, torch.float64)
        t = lean_split(s, rtol)
        self.head = self.rank - t
        self.S, self.small = s.to(keep), (vh if self.tall else u).to(keep).contiguous()
        if t:
            self.tail = (u[:, self.head:] if self.tall else vh[self.head:].T).to(keep).contiguous()
        if self.svd_buffers == "compact":
            self.side = side_of(self.host, self.tall, t)

    @classmethod
    def kinds_for(cls, options: Mapping[str, Any]) -> frozenset[str]:
        if check_one_d(options.get("one_d", DEFAULT_ONE_D)) == "none":
            return cls.host_kinds - NORMS
        return cls.host_kinds

    def default_lr(self, name: str) -> float | None:
        """1e-3 for spectral shifts (≈1,000× full fine-tuning), 1e-6 for norm-layer shifts."""
        return LR_ONE_D if self.is_norm else LR_SHIFTS

    # ------------------------------------------------------------------ ΔW

    def gain(self, multiplier: Tensor | float, train: bool = False) -> Tensor:
        """g = ReLU(σ + s·δ) − σ (rank dropout applied to whole components when `train`)."""
        g = spectral_gain(self.S, self.delta, multiplier)
        mask = self.rank_mask(self.rank, g) if train else None
        return g if mask is None else g * mask

    def spectral_matrix(self, multiplier: Tensor | float, train: bool = False) -> Tensor:
        """ΔW(s) as an (out, n) matrix in the buffers' precision."""
        if self.direct:
            vec = self.gain_delta
            mask = self.rank_mask(self.rank, vec) if train else None
            if mask is not None:
                vec = vec * mask
            if isinstance(multiplier, Tensor):
                multiplier = multiplier.to(vec.dtype)
            return (multiplier * vec).reshape(1, -1)
        if self.recovers:
            g = self.gain(multiplier, train)
            return lean_delta(as_matrix(self.host.weight), self.small, self.S, g, self.tail, self.tall)
        return spectral_delta(self.U, self.gain(multiplier, train), self.Vh)

    def reads_host_weight(self) -> str | None:
        """compact/lean recover singular vectors from the host weight, so it must be the base."""
        if not self.recovers:
            return None
        return (f"svdiff with svd_buffers={self.svd_buffers!r} recovers its singular vectors from the host weight "
                "(use svd_buffers='float32' to keep them)")

    def delta_at(self, multiplier: float | Tensor, train: bool = False) -> Tensor:
        """ΔW(s) with s inside the ReLU, in merge precision: what rebuilds and merges add to W."""
        delta = self.spectral_matrix(multiplier, train)
        return delta.reshape(self.host.weight.shape).to(self.merge_dtype)

    def delta_weight(self, train: bool = False) -> Tensor:
        """ΔW at s = 1."""
        return self.delta_at(1.0, train)

    def add_delta(self, acc: Tensor, multiplier: float | Tensor, train: bool = False, inplace: bool = False) -> Tensor:
        delta = self.delta_at(multiplier, train).to(acc.dtype)
        return acc.add_(delta) if inplace else acc + delta

    # ------------------------------------------------------------------ forward paths

    def fast_path(self, train: bool) -> str | None:
        """compact: the output map ("out", "emb") or the input map ("in") of `side`; float32 and
        float64: the spectral bypass; lean, norms and grouped convs: none (rebuild)."""
        if self.is_norm or self.host.groups != 1:
            return None
        if self.recovers:
            return {"out": "output", "emb": "output", "in": "input"}.get(self.side or "")
        return "bypass"

    def spectral_bypass(self, x: Tensor, multiplier: Tensor | float, train: bool) -> Tensor:
        """op(x, ΔW(s)) without building ΔW from U and Vh: (x·Vhᵀ)·diag(g)·Uᵀ."""
        dtype = x.dtype if x.is_floating_point() else self.host.weight.dtype  # embedding: x holds indices
        g = self.gain(multiplier, train).to(dtype)
        return self.factored_bypass(x, self.U.to(dtype), g, self.Vh.to(dtype), train)

    def factored_bypass(self, x: Tensor, u: Tensor, g: Tensor, vh: Tensor, train: bool) -> Tensor:
        """op(x, U·diag(g)·Vh) for explicit factors U (out, k), Vh (k, n): the Vh step in the host's
        own geometry (conv: a conv with Vh as a (k, in, k…) kernel; embedding: rows of U)."""
        host, k = self.host, g.shape[0]
        if host.kind == "embedding":
            h = F.embedding(x, u)  # U[x]: (…, k)
            if train and self.dropout:
                h = F.dropout(h, self.dropout)
            return (h * g) @ vh
        if host.is_conv:
            h = host.op(x, vh.reshape(k, host.in_features, *host.kernel_size), None)
            if train and self.dropout:
                h = F.dropout(h, self.dropout)
            h = h * g.reshape(k, *host.ones)
            return host.pointwise(h, u.reshape(host.out_features, k, *host.ones))
        h = F.linear(x, vh)
        if train and self.dropout:
            h = F.dropout(h, self.dropout)
        return F.linear(h * g, u)

    def side_terms(self, dtype: torch.dtype, multiplier: Tensor | float, train: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(g, Q, g/σ) for the compact paths: the gain, the small factor's head as (channels, head)
        and the head's ratio, in `dtype`."""
        g = self.gain(multiplier, train)
        head = self.head
        q = self.small[:, :head] if self.side == "out" else self.small[:head].T
        return g.to(dtype), q.to(dtype), (g[:head] / self.S[:head]).to(dtype)

    def side_map(self, t: Tensor, q: Tensor, ratio: Tensor, train: bool, shift: Tensor | None = None,
                 acc: Tensor | None = None) -> Tensor:
        """acc + Q·diag(g/σ)·Qᵀ·(t − shift) along the channel axis (`acc` defaults to `t`; `shift`:
        the bias on the output side). The output side gives U·diag(g/σ)·Uᵀ·(W·x) = ΔW·x, the input
        side Vhᵀ·diag(g/σ)·Vh·x, which W maps to ΔW·x; the sum is formed inside the last matmul."""
        host = self.host
        conv = host.is_conv and self.side != "emb"
        h = host.pointwise(t, q.T) if conv else t @ q
        if shift is not None:
            bias = q.T @ shift.to(q.dtype)
            h = h - (bias.reshape(-1, *host.ones) if conv else bias)
        if train and self.dropout:
            h = F.dropout(h, self.dropout)
        acc = t if acc is None else acc
        if conv:
            return host.pointwise_add(acc, h * ratio.reshape(-1, *host.ones), q)
        flat = torch.addmm(acc.reshape(-1, acc.shape[-1]), (h * ratio).reshape(-1, ratio.shape[0]), q.T)
        return flat.reshape(acc.shape)

    def input_map(self, x: Tensor, multiplier: float | Tensor, train: bool = False) -> Tensor:
        """x' with op(x', W) = op(x, W + ΔW(s)) (side "in": a tall Linear or 1×1 conv without tail)."""
        g, q, ratio = self.side_terms(x.dtype, multiplier, train)
        return self.side_map(x, q, ratio, train)

    def output_map(self, base_out: Tensor, x: Tensor, multiplier: float | Tensor, train: bool = False) -> Tensor:
        """op(x, W + ΔW(s)) through the pure host output (sides "out", "emb")."""
        g, q, ratio = self.side_terms(base_out.dtype, multiplier, train)
        out = self.side_map(base_out, q, ratio, train, self.host.bias if self.side == "out" else None, acc=base_out)
        return out if self.tail is None else out + self.tail_bypass(x, g, train)

    def tail_bypass(self, x: Tensor, g: Tensor, train: bool) -> Tensor:
        """op(x, ΔW) of the singular values kept explicitly (`tail`), from their two factors."""
        head = self.head
        if self.tall:
            return self.factored_bypass(x, self.tail.to(g.dtype), g[head:], self.small[head:].to(g.dtype), train)
        return self.factored_bypass(x, self.small[:, head:].to(g.dtype), g[head:], self.tail.T.to(g.dtype), train)

    def bypass(self, x: Tensor, train: bool = False) -> Tensor:
        """op(x, ΔW) at s = 1 (float32/float64 layouts: from U and Vh)."""
        return self.spectral_bypass(x, 1.0, train)

    def bypass_add(self, out: Tensor, x: Tensor, multiplier: float | Tensor, train: bool = False,
                   row_scale: Tensor | None = None) -> Tensor:
        """out + op(x, ΔW(s)) with s inside the ReLU (never a factor outside)."""
        y = self.spectral_bypass(x, multiplier, train).to(out.dtype)
        return out + (y if row_scale is None else row_scale * y)

    def rebuild_flops(self) -> int:
        if self.is_norm:
            return self.host.weight.numel()
        out, n = as_matrix(self.host.weight).shape
        return out * n * self.rank + (self.rank**3 if self.recovers else 0)  # recovering: r × r first

    def bypass_flops(self, tokens: int) -> int:
        out, n = as_matrix(self.host.weight).shape
        if self.side is not None:
            channels = {"out": out, "in": n, "emb": n}[self.side]
            tail = self.rank - self.head
            return tokens * (2 * channels * self.head + tail * (n + out + 1))
        if self.host.kind == "embedding":
            return tokens * self.rank * (n + 1)  # gather, gain, then r × dim
        return tokens * self.rank * (n + out + 1)

    # ------------------------------------------------------------------ files

    def base_hash_tensor(self) -> Tensor:
        return torch.tensor(self.base_hash, dtype=torch.int64)

    def file_tensors(self) -> dict[str, Tensor]:
        key, value = ("gain_delta", self.gain_delta) if self.direct else ("delta", self.delta)
        return {key: value.detach(), "base_hash": self.base_hash_tensor()}

    def buffer_bytes(self) -> int:
        """Memory held by the SVD buffers of this layer."""
        return sum(b.numel() * b.element_size() for b in self.buffers() if b is not self.multiplier)

    @classmethod
    def from_file_tensors(cls, host: HostLayer, tensors: Mapping[str, Tensor], name: str, **options: Any) -> SVDiff:
        is_norm = host.kind in NORMS
        if "delta" in tensors and "gain_delta" in tensors:
            raise IncompatibleFileError(
                f"{name}: holds both delta (spectral shift) and gain_delta (direct norm shift); expected one",
                keys=[f"{name}.delta", f"{name}.gain_delta"],
            )
        if "gain_delta" in tensors and not is_norm:
            raise IncompatibleFileError(
                f"{name}.gain_delta: a direct norm-gain shift, but the layer is a {host.kind} "
                f"{type(host.module).__name__}{tuple(host.weight.shape)}",
                keys=[f"{name}.gain_delta"],
            )
        if "gain_delta" not in tensors:
            require_keys(tensors, name, ("delta",))
        key = "gain_delta" if "gain_delta" in tensors else "delta"
        value = tensors[key]
        if key == "gain_delta":
            expected = tuple(host.weight.shape)
        else:
            expected = (min(as_matrix(host.weight).shape),)
        if tuple(value.shape) != expected and not (value.numel() == 1 and expected == (1,)):
            what = "one shift per singular value" if key == "delta" else "one shift per channel"
            raise ShapeMismatchError(
                f"{name}.{key}: expected shape {expected} ({what} of this "
                f"{type(host.module).__name__}{tuple(host.weight.shape)}), found {tuple(value.shape)}",
                keys=[f"{name}.{key}"],
            )
        check_base(host, tensors, name)
        if is_norm:
            options = {**options, "one_d": "direct" if key == "gain_delta" else "scalar"}
        module = cls(host, **options)
        with torch.no_grad():
            getattr(module, key).copy_(value.reshape(expected))
        return module

    @classmethod
    def combine_native(cls, parts: Sequence[CombinePart], build: Callable[[Mapping[str, Tensor]], Any],
                       base: Any, dtype: torch.dtype) -> tuple[dict[str, Tensor], int | None]:
        """Shifts add in δ space: ReLU(σ + Σ wᵢ·δᵢ) (the paper's rule; the multiplier sits inside
        the ReLU, so this is not Σ wᵢ·ΔWᵢ where σ + δ clips). All files must share the base."""
        keys = {("gain_delta" if "gain_delta" in t else "delta") for _, t in parts}
        if len(keys) != 1:
            raise NotNative("spectral (delta) and direct norm (gain_delta) shifts do not add")
        hashes = {int(t["base_hash"].reshape(-1)[0]) for _, t in parts if "base_hash" in t}
        if len(hashes) > 1:
            raise NotNative("the files were trained on different base weights (base_hash differs)")
        return cls.summed(parts, (keys.pop(),), dtype)

    def config(self) -> dict[str, Any]:
        return {"algo": self.algo, "one_d": self.one_d, "svd_buffers": self.svd_buffers}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank {self.rank}, one_d={self.one_d}, svd_buffers={self.svd_buffers}"


def side_of(host: HostLayer, tall: bool, tail: int) -> str | None:
    """The compact bypass a layer has: "out" for a wide (or square) Linear/conv, "in" for a tall
    Linear or 1×1 conv without near-zero singular values, "emb" for a tall Embedding; None (rebuild
    only) for a tall conv with a larger kernel, a wide Embedding or a grouped conv."""
    if host.kind == "embedding":
        return "emb" if tall else None
    if host.groups != 1:
        return None
    if not tall:
        return "out"
    if tail == 0 and (host.kind == "linear" or all(k == 1 for k in host.kernel_size)):
        return "in"
    return None


def check_base(host: HostLayer, tensors: Mapping[str, Tensor], name: str) -> None:
    """Refuse a file whose `base_hash` does not match the layer's weights (before any SVD)."""
    stored = tensors.get("base_hash")
    if stored is None:
        return
    key = f"{name}.base_hash"
    if stored.dtype not in (torch.int64, torch.int32) or stored.numel() != 1:
        raise IncompatibleFileError(
            f"{key}: expected one int64 checksum, found {stored.dtype} of shape {tuple(stored.shape)}", keys=[key]
        )
    weight = host.weight.detach()
    if int(stored.reshape(-1)[0]) == weight_checksum(weight, compute_dtype(weight.dtype)):
        return
    hint = ""
    if weight.dtype in (torch.float16, torch.bfloat16):
        hint = (
            f" This layer is {weight.dtype}: shifts trained on float32 weights need the float32 base "
            "(its SVD differs by 1–10 % after rounding) — load the model in float32, merge or bake, then cast."
        )
    raise IncompatibleFileError(
        f"{key}: the base model differs — the weights of this {type(host.module).__name__}"
        f"{tuple(weight.shape)} are not the ones the spectral shifts were trained on (checksum mismatch). "
        "SVDiff shifts are defined on the base's singular vectors and do not transfer to another base."
        + hint,
        keys=[key],
    )
