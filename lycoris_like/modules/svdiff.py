"""SVDiff: spectral shifts (Han et al. 2023, §3.2). Only a shift δ per singular value is trained.

Host weight W (flattened out × in·k…) = U·diag(σ)·Vh, computed once per layer in float64 from the
host's weight (tall orientation). W' = U·diag(ReLU(σ + s·δ))·Vh, so

    ΔW(s) = U·diag(ReLU(σ + s·δ) − σ)·Vh,

with the runtime multiplier s **inside** the ReLU (`linear_in_multiplier = False`): s = 0 gives the
base exactly, δ = 0 gives ΔW = 0 exactly, and `delta_weight()` is ΔW(1). Norm layers follow
`one_d`: "scalar" (svdiff-pytorch: one δ per layer, γ' = ReLU(‖γ‖ + s·δ)·γ/‖γ‖ — the same
formula on γ seen as a 1 × C matrix), "direct" (the paper: a shift of γ's own shape, Δγ = s·δ),
or "none". Biases are never trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleFileError, MergeError, ShapeMismatchError
from ..hosts import LINEAR_AND_CONV, NORMS, HostLayer, compute_dtype
from ..kernels.spectral import (
    as_matrix,
    lean_delta,
    lean_split,
    spectral_delta,
    spectral_gain,
    tall_svd,
    weight_checksum,
)
from .base import MERGE_STACK, AdapterModule, require_keys
from .registry import register_algorithm

ONE_D_MODES = ("scalar", "direct", "none")
SVD_BUFFERS = ("float32", "float64", "lean")
DEFAULT_ONE_D = "scalar"
LR_SHIFTS = 1e-3
LR_ONE_D = 1e-6


def check_one_d(value: Any) -> str:
    if value not in ONE_D_MODES:
        raise ConfigError(f"one_d must be one of {ONE_D_MODES}, got {value!r}")
    return value


@register_algorithm("svdiff")
class SVDiff(AdapterModule):
    """Spectral shifts on Linear, Conv1d/2d/3d, Embedding and (per `one_d`) LayerNorm/GroupNorm.

    Options: `one_d` ("scalar" default, "direct", "none"); `svd_buffers` — what is kept per layer:
    "float32" (default: U, σ, Vh in float32), "float64" (the same in float64), or "lean" (σ and
    the smaller factor in float64; the larger factor is recovered from the host weight at every
    rebuild — 2.4× less memory on the SD1.5 UNet, no bypass, and the host weight must still be the base).
    `dim`/`alpha` are accepted and ignored. `dropout` acts on the r spectral activations (x·Vhᵀ)
    in the bypass; `rank_dropout` drops whole singular components (norm "direct": entries of δ).
    """

    restorable_options = frozenset({"svd_buffers"})

    host_kinds = LINEAR_AND_CONV | NORMS | frozenset({"embedding"})
    file_keys = frozenset({"delta", "gain_delta", "base_hash"})
    signature_keys = frozenset({"delta", "gain_delta"})
    dropout_in_bypass = True
    linear_in_multiplier = False

    def __init__(
        self,
        host: HostLayer,
        dim: int = 1,
        alpha: float | None = None,
        *,
        one_d: str = DEFAULT_ONE_D,
        svd_buffers: str = "float32",
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
        self.lean = svd_buffers == "lean" and not self.is_norm  # a 1 × C factor is already tiny
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
        self.tall = matrix.shape[0] >= matrix.shape[1]
        self.rank = min(matrix.shape)
        self.gain_delta = None
        self.delta = nn.Parameter(torch.zeros(self.rank, **fac))
        keep = torch.float64 if svd_buffers != "float32" else torch.float32
        keep = torch.promote_types(keep, compute_dtype(weight.dtype))
        with torch.no_grad():
            u, s, vh = tall_svd(matrix, torch.float64)
        self.register_buffer("S", s.to(keep), persistent=False)
        if not self.lean:
            self.register_buffer("U", u.to(keep), persistent=False)
            self.register_buffer("Vh", vh.to(keep), persistent=False)
            self.register_buffer("small", None, persistent=False)
            self.register_buffer("tail", None, persistent=False)
            return
        # Lean: σ and the small square factor; the large one is W·Vhᵀ/σ (tall) or Uᵀ·W/σ (wide),
        # except for singular values too small to divide by, whose vectors are kept in `tail`.
        t = lean_split(s)
        head = self.rank - t
        self.register_buffer("U", None, persistent=False)
        self.register_buffer("Vh", None, persistent=False)
        self.register_buffer("small", (vh if self.tall else u).contiguous(), persistent=False)
        tail = u[:, head:] if self.tall else vh[head:].T
        self.register_buffer("tail", tail.contiguous() if t else None, persistent=False)

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
        g = self.gain(multiplier, train)
        if self.lean:
            if self.host.weight.__dict__.get(MERGE_STACK):
                raise MergeError(
                    "svdiff with svd_buffers='lean' recovers its singular vectors from the host weight, "
                    "which a merged network has changed; unmerge first, or use svd_buffers='float32'"
                )
            return lean_delta(as_matrix(self.host.weight), self.small, self.S, g, self.tail, self.tall)
        return spectral_delta(self.U, g, self.Vh)

    def scaled_delta(self, multiplier: Tensor | None, train: bool = False) -> Tensor:
        """ΔW(s) with s inside the ReLU, in merge precision: what rebuilds and merges add to W."""
        if multiplier is None:
            multiplier = torch.ones((), dtype=self.param_dtype, device=self.host.weight.device)
        delta = self.spectral_matrix(multiplier, train and self.training_now)
        return delta.reshape(self.host.weight.shape).to(self.merge_dtype)

    def adapter_delta(self, train: bool = False) -> Tensor:
        """ΔW at s = 1."""
        return self.scaled_delta(None, train)

    # ------------------------------------------------------------------ bypass

    @property
    def has_bypass(self) -> bool:
        if self.is_norm or self.lean:
            return False
        return self.host.groups == 1

    def spectral_bypass(self, x: Tensor, multiplier: Tensor | float) -> Tensor:
        """op(x, ΔW(s)) without building ΔW: (x·Vhᵀ)·diag(g)·Uᵀ, the Vh step in the host's own
        geometry (conv: a conv with Vh as an (r, in, k…) kernel; embedding: rows of U)."""
        host = self.host
        dtype = x.dtype if x.is_floating_point() else host.weight.dtype  # embedding: x holds indices
        g = self.gain(multiplier, self.training_now).to(dtype)
        u, vh = self.U.to(dtype), self.Vh.to(dtype)
        if host.kind == "embedding":
            h = F.embedding(x, u)  # U[x]: (…, r)
            if self.dropout and self.training_now:
                h = F.dropout(h, self.dropout)
            return (h * g) @ vh
        if host.is_conv:
            h = host.op(x, vh.reshape(self.rank, host.in_features, *host.kernel_size), None)
            if self.dropout and self.training_now:
                h = F.dropout(h, self.dropout)
            h = h * g.reshape(self.rank, *host.ones)
            return host.pointwise(h, u.reshape(host.out_features, self.rank, *host.ones))
        h = F.linear(x, vh)
        if self.dropout and self.training_now:
            h = F.dropout(h, self.dropout)
        return F.linear(h * g, u)

    def bypass(self, x: Tensor, base_out: Tensor) -> Tensor:
        """op(x, ΔW) at s = 1 (the contract's multiplier-free contribution); the forward uses
        `adapter_output`, which puts the runtime multiplier inside the ReLU."""
        return self.spectral_bypass(x, 1.0)

    def adapter_output(self, x: Tensor, base_out: Tensor) -> Tensor:
        """The separate path with the multiplier inside the ReLU (never a factor outside)."""
        if self.can_bypass:
            return self.spectral_bypass(x, self.multiplier)
        dtype = x.dtype if x.is_floating_point() else self.host.weight.dtype
        out = self.host.op(x, self.scaled_delta(self.multiplier, train=True).to(dtype), None)
        if self.dropout and self.training_now:
            out = F.dropout(out, self.dropout)
        return out

    def rebuild_flops(self) -> int:
        if self.is_norm:
            return self.host.weight.numel()
        out, n = as_matrix(self.host.weight).shape
        return (2 if self.lean else 1) * out * n * self.rank

    def bypass_flops(self, tokens: int) -> int:
        out, n = as_matrix(self.host.weight).shape
        if self.host.kind == "embedding":
            return tokens * self.rank * (n + 1)  # gather, gain, then r × dim
        return tokens * self.rank * (n + out + 1)

    # ------------------------------------------------------------------ files

    def base_hash_tensor(self) -> Tensor:
        return torch.tensor(self.base_hash, dtype=torch.int64)

    def adapter_tensors(self) -> dict[str, Tensor]:
        key, value = ("gain_delta", self.gain_delta) if self.direct else ("delta", self.delta)
        return {key: value.detach(), "base_hash": self.base_hash_tensor()}

    def buffer_bytes(self) -> int:
        """Memory held by the SVD buffers of this layer."""
        return sum(b.numel() * b.element_size() for b in self.buffers() if b is not self.multiplier)

    @classmethod
    def adapter_from_tensors(cls, host: HostLayer, tensors: Mapping[str, Tensor], name: str, **options: Any) -> SVDiff:
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

    def config(self) -> dict[str, Any]:
        return {"algo": self.algo, "one_d": self.one_d, "svd_buffers": self.svd_buffers}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank {self.rank}, one_d={self.one_d}, svd_buffers={self.svd_buffers}"


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
