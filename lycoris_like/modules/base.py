"""The one contract every algorithm fulfils: what is ΔW for this host layer?

An `AdapterModule` owns its parameters and answers `delta_weight()` (host-weight shape, merge
ratio included, runtime multiplier excluded). Everything around it — the multiplier, the forward
dispatch, merging, dropout plumbing, file validation — lives here or in the network, once.
"""

from __future__ import annotations

import inspect
import math
import struct
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleFileError, ShapeMismatchError, UnsupportedLayerError
from ..hosts import LINEAR_AND_CONV, HostLayer, compute_dtype
from ..kernels.dora import dora_delta, weight_norm
from ..kernels.patch import EntryPatch

FORWARD_MODES = ("auto", "rebuild", "bypass")
MERGE_STACK = "_lycoris_like_merges"


def merge_stack(weight: Tensor) -> list[list[int]]:
    """Per host weight tensor: which networks merged into it, in order, and the tensor version
    each left behind (so unmerges run in reverse order and never undo later training)."""
    return weight.__dict__.setdefault(MERGE_STACK, [])


class AdapterModule(nn.Module):
    """Base class of every algorithm. Identity at init: `delta_weight()` is exactly zero.

    An algorithm implements `adapter_delta()` (its own ΔW, merge ratio included) and its file
    layout (`adapter_tensors`, `adapter_from_tensors`), optionally `has_bypass`/`bypass` and
    `delta_bias`. Everything else — DoRA, dropout plumbing, the multiplier, the rebuild-or-bypass
    choice — is here, once.
    """

    algo: ClassVar[str] = ""
    host_kinds: ClassVar[frozenset[str]] = LINEAR_AND_CONV
    file_keys: ClassVar[frozenset[str]] = frozenset()
    """Every key suffix the algorithm reads and writes (`lora_down.weight`, `alpha`, …)."""
    signature_keys: ClassVar[frozenset[str]] = frozenset()
    """Suffixes whose presence identifies the algorithm in a file."""
    supports_dora: ClassVar[bool] = False
    """Whether `weight_decompose=True` (DoRA) applies; adds the `dora_scale` key."""
    dropout_in_bypass: ClassVar[bool] = False
    """Whether `bypass` applies `dropout` itself (LoRA: on the rank-r activations)."""
    restorable_options: ClassVar[frozenset[str]] = frozenset()
    """Options that change how ΔW is computed but not the file's keys (SVDiff's `svd_buffers`):
    kept in our metadata and passed back on load."""
    linear_in_multiplier: ClassVar[bool] = True
    """Whether the adapted weight is W + m·ΔW (SVDiff's multiplier sits inside a ReLU)."""
    bypass_uses_base_out: ClassVar[bool] = False
    """Whether `bypass` reads `base_out` ((IA)³ output side); it then needs the pure host output,
    so the dispatcher rebuilds it instead whenever another adapter rebuilds in the same call."""

    def __init__(
        self,
        host: HostLayer,
        *,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        rank_dropout_scale: bool = False,
        weight_decompose: bool = False,
        wd_on_out: bool = True,
    ) -> None:
        super().__init__()
        if host.kind not in self.host_kinds:
            raise UnsupportedLayerError(
                f"{self.algo} cannot adapt a {host.kind} layer ({type(host.module).__name__}); "
                f"it supports {sorted(self.host_kinds)}"
            )
        for name, p in (("dropout", dropout), ("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
            if not 0.0 <= float(p) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {p!r}")
        if weight_decompose and not self.supports_dora:
            raise ConfigError(f"weight_decompose (DoRA) is not available for {self.algo}")
        self.host = host
        self.dropout = float(dropout)
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.rank_dropout_scale = bool(rank_dropout_scale)
        self.wd_on_out = bool(wd_on_out)
        self.enabled = True
        self.merged = False
        self.forward_mode = "auto"
        self.register_buffer("multiplier", torch.ones((), **self.factory()), persistent=False)
        self.dora_scale = (
            nn.Parameter(weight_norm(host.weight.detach().to(self.param_dtype), self.wd_on_out))
            if weight_decompose
            else None
        )

    # ----------------------------------------------------------------- what an algorithm implements

    def adapter_delta(self, train: bool = False) -> Tensor:
        """The algorithm's own ΔW in the host weight's shape, merge ratio included;
        `train=True` applies training-time randomness (rank dropout)."""
        raise NotImplementedError

    def delta_bias(self) -> Tensor | None:
        """Δb for algorithms that change the bias; None otherwise."""
        return None

    @property
    def has_bypass(self) -> bool:
        """Whether the algorithm has a cheap `bypass` for this host."""
        return False

    def bypass(self, x: Tensor, base_out: Tensor) -> Tensor:
        """`op(x, ΔW, Δb)` without building ΔW (multiplier excluded); `base_out` is `op(x, W, b)`."""
        raise NotImplementedError

    def output_scale(self, base_out: Tensor) -> Tensor | None:
        """For an adapter whose contribution is base_out ⊙ s (a per-channel rescale: (IA)³ on the
        output side): m·s shaped for the output's channel axis, so the dispatcher applies every
        such adapter with one multiply, base_out ⊙ (1 + Σ mᵢ·sᵢ). None: use `adapter_output`."""
        return None

    @property
    def maps_input(self) -> bool:
        """Whether the bypass acts on the host's input (`input_map`) instead of adding to its output."""
        return False

    def input_map(self, x: Tensor) -> Tensor:
        """x' with op(x', W, b) = op(x, W + m·ΔW, b), for a bypass that `maps_input` (SVDiff's compact
        layout on a tall weight); the dispatcher then runs the host op on x'."""
        raise NotImplementedError

    def rebuild_flops(self) -> int:
        """Cost of building ΔW once (cost-model input)."""
        return self.host.weight.numel()

    def bypass_flops(self, tokens: int) -> int:
        """Cost of one bypass forward over `tokens` positions (cost-model input)."""
        return tokens * self.host.weight.numel()

    def adapter_tensors(self) -> dict[str, Tensor]:
        """The algorithm's tensors in a file, keyed by suffix (LyCORIS names)."""
        raise NotImplementedError

    @classmethod
    def adapter_from_tensors(
        cls, host: HostLayer, tensors: Mapping[str, Tensor], name: str, **options: Any
    ) -> AdapterModule:
        """Build the adapter a file describes (passing `options` to `__init__`); raise a typed
        error naming `name.<key>` if it does not fit the host."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Algorithm, rank and options, for metadata and inspection."""
        return {"algo": self.algo}

    def default_lr(self, name: str) -> float | None:
        """The learning rate the algorithm recommends for parameter `name`, or None for the
        optimizer's own (see `training.param_groups`)."""
        return None

    # ----------------------------------------------------------------- the contract consumers use

    def delta_weight(self) -> Tensor:
        """ΔW in the host weight's shape, merge ratio included, multiplier excluded."""
        return self._decompose(self.adapter_delta(False))

    def train_delta_weight(self) -> Tensor:
        """ΔW as the training forward sees it (rank dropout applied); merges never use this."""
        return self._decompose(self.adapter_delta(self.training_now))

    def scaled_delta(self, multiplier: Tensor | None, train: bool = False) -> Tensor:
        """m·ΔW in merge precision: what the rebuild forward and merges add to W. `None` means
        m = 1 exactly: no full-size multiply, the same bits (merges pass it). An algorithm whose
        multiplier is not a plain factor (SVDiff: inside a ReLU) overrides this."""
        delta = (self.train_delta_weight() if train else self.delta_weight()).to(self.merge_dtype)
        return delta if multiplier is None else multiplier.to(self.merge_dtype) * delta

    def scaled_delta_bias(self, multiplier: Tensor | None) -> Tensor | None:
        """m·Δb in merge precision, or None (`multiplier` None: m = 1)."""
        delta = self.delta_bias()
        if delta is None:
            return None
        delta = delta.to(self.merge_dtype)
        return delta if multiplier is None else multiplier.to(self.merge_dtype) * delta

    def update_weight(self, acc: Tensor, multiplier: Tensor | None, train: bool = False, inplace: bool = False) -> Tensor:
        """`acc + m·ΔW`, `acc` being the host weight (plus earlier adapters) in merge precision;
        with `inplace`, written into `acc` (merges, which back the weight up first). A sparse
        algorithm (SaRA) overrides this to touch only its own entries."""
        delta = self.scaled_delta(multiplier, train).to(acc.dtype)
        return acc.add_(delta) if inplace else acc + delta

    def entry_patches(self, multiplier: Tensor | None, train: bool = False) -> list[EntryPatch] | None:
        """W + m·ΔW (and b + m·Δb) as a few changed entries of the host's own tensors, when the
        adapter changes only a few (SaRA): the forward then writes them into the host in place
        for the call (`kernels.patch`) instead of copying the weight. None: rebuild or bypass."""
        return None

    @property
    def changes_bias(self) -> bool:
        """Whether the adapter changes the host's bias (merges write and back up only what changes)."""
        return self.delta_bias() is not None

    def update_bias(self, acc: Tensor, multiplier: Tensor | None, inplace: bool = False) -> Tensor:
        """`acc + m·Δb` (unchanged for algorithms without a bias delta); `inplace` as in
        `update_weight`."""
        delta = self.scaled_delta_bias(multiplier)
        if delta is None:
            return acc
        return acc.add_(delta.to(acc.dtype)) if inplace else acc + delta.to(acc.dtype)

    def _decompose(self, delta: Tensor) -> Tensor:
        if self.dora_scale is None:
            return delta
        return dora_delta(self.host.weight.to(delta.dtype), delta, self.dora_scale, self.wd_on_out)

    @property
    def can_bypass(self) -> bool:
        """Whether the bypass path applies now. DoRA: on the output axis only (W′ = s ⊙ (W + ΔW)
        scales output channels) and without training-time dropout, whose masks the norm would
        otherwise have to share."""
        if not self.has_bypass:
            return False
        if self.dora_scale is None:
            return True
        return self.wd_on_out and not (self.training_now and (self.dropout or self.rank_dropout))

    @property
    def reads_base_out(self) -> bool:
        """Whether the bypass needs the pure host output (it cannot share a call with a rebuild)."""
        return self.bypass_uses_base_out or self.dora_scale is not None

    def merged_norm(self) -> Tensor:
        """‖W + ΔW‖ along the DoRA axis, detached (DoRA §4.3), in float32 or wider. Algorithms
        with a route that does not build ΔW override it (LoRA)."""
        with torch.no_grad():
            weight = self.host.weight
            dtype = torch.promote_types(weight.dtype, torch.float32)
            return weight_norm(weight.to(dtype) + self.adapter_delta(False).to(dtype), self.wd_on_out)

    def dora_bypass(self, base_out: Tensor, delta_out: Tensor) -> Tensor:
        """(W′ − W)·x for output-axis DoRA from the host output and ΔW·x: with s = m / ‖W + ΔW‖,
        W′x = s ⊙ (Wx + ΔWx), so the adapter adds (s − 1) ⊙ Wx + s ⊙ ΔWx (Wx = host output − b)."""
        norm = self.merged_norm()
        magnitude = self.dora_scale.to(norm.dtype)
        scale = torch.where(norm > 0, magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.ones_like(norm))
        channel = (-1,) if not self.host.is_conv else (-1, *([1] * (base_out.dim() - 2)))
        s = scale.reshape(channel).to(base_out.dtype)
        bias = self.host.bias
        plain = base_out if bias is None else base_out - bias.to(base_out.dtype).reshape(channel)
        return (s - 1) * plain + s * delta_out

    def adapter_output(self, x: Tensor, base_out: Tensor) -> Tensor:
        """The adapter's separate contribution to the output, multiplier included: the bypass, or —
        when dropout needs a separate path and there is no bypass — the host op on ΔW, Δb;
        output dropout here."""
        if self.can_bypass:
            out = self.bypass(x, base_out)
            if self.dora_scale is not None:
                out = self.dora_bypass(base_out, out)
        else:
            delta_bias = self.delta_bias()
            out = self.host.op(x, self.train_delta_weight().to(x.dtype), None if delta_bias is None else delta_bias.to(x.dtype))
        if self.dropout and self.training_now and not (self.can_bypass and self.dropout_in_bypass):
            out = F.dropout(out, self.dropout)
        return out * self.multiplier

    def add_output(self, out: Tensor, x: Tensor, base_out: Tensor) -> Tensor:
        """`out` plus `adapter_output` — what the dispatcher calls; an algorithm whose bypass ends in
        a linear map fuses the addition into it (LoRA)."""
        return out + self.adapter_output(x, base_out).to(out.dtype)

    def file_tensors(self) -> dict[str, Tensor]:
        """The tensors written to a file, keyed by suffix."""
        tensors = self.adapter_tensors()
        if self.dora_scale is not None:
            tensors["dora_scale"] = self.dora_scale.detach()
        return tensors

    @classmethod
    def from_file_tensors(
        cls, host: HostLayer, tensors: Mapping[str, Tensor], name: str, **options: Any
    ) -> AdapterModule:
        """Build the adapter a file describes (`options`: `restorable_options` from metadata or the
        caller); DoRA's axis comes from the `dora_scale` shape."""
        scale = tensors.get("dora_scale")
        if scale is None:
            return cls.adapter_from_tensors(host, tensors, name, **options)
        on_out = dora_axis(name, host, scale)
        own = {k: v for k, v in tensors.items() if k != "dora_scale"}
        module = cls.adapter_from_tensors(host, own, name, weight_decompose=True, wd_on_out=on_out, **options)
        with torch.no_grad():
            module.dora_scale.copy_(scale.reshape(module.dora_scale.shape))
        return module

    # ----------------------------------------------------------------- shared helpers

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """Keyword options `create_network` may pass: the keyword-only `__init__` arguments of
        every class from the algorithm up to this base."""
        names = {"dropout", "rank_dropout", "module_dropout", "rank_dropout_scale"}
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                for param in inspect.signature(klass.__init__).parameters.values():
                    if param.kind is inspect.Parameter.KEYWORD_ONLY:
                        names.add(param.name)
            if klass is AdapterModule:
                break
        if not cls.supports_dora:
            names -= {"weight_decompose", "wd_on_out"}
        return frozenset(names)

    @classmethod
    def kinds_for(cls, options: Mapping[str, Any]) -> frozenset[str]:
        """The host kinds a network with these options adapts (SVDiff's norms depend on `one_d`)."""
        return cls.host_kinds

    @property
    def param_dtype(self) -> torch.dtype:
        return compute_dtype(self.host.weight.dtype)

    @property
    def merge_dtype(self) -> torch.dtype:
        """The precision W + m·ΔW is computed in before the one cast."""
        return compute_dtype(self.host.weight.dtype)

    @property
    def shared_merge_dtype(self) -> torch.dtype:
        """The precision when other adapters share the same rebuild (SaRA: float64, so that
        W + Σ mᵢ·ΔWᵢ is rounded once)."""
        return self.merge_dtype

    def factory(self) -> dict[str, Any]:
        """`device`/`dtype` keyword arguments for new parameters."""
        return {"device": self.host.weight.device, "dtype": self.param_dtype}

    @property
    def training_now(self) -> bool:
        """Training-time randomness applies only when both the network and the host train."""
        return self.training and self.host.module.training

    def is_active(self) -> bool:
        """Whether this forward applies the adapter (module dropout draws here, in training only)."""
        if not self.enabled or self.merged:
            return False
        if self.module_dropout and self.training_now and torch.rand(()) < self.module_dropout:
            return False
        return True

    def use_bypass(self, x: Tensor) -> bool:
        """Bypass or rebuild for this call: dropout needs a separate path; else `forward_mode`
        decides, or (auto) the cheaper one by the cost model."""
        if self.dropout and self.training_now:
            return True
        if not self.can_bypass or self.forward_mode == "rebuild":
            return False
        if self.forward_mode == "bypass":
            return True
        tokens = self.host.tokens(x)
        if torch.is_grad_enabled() and self._trainable():
            # Rebuilding makes autograd form the full weight gradient (tokens·|W|) on top.
            return 3 * self.bypass_flops(tokens) < self.rebuild_flops() + tokens * self.host.weight.numel()
        return self.bypass_flops(tokens) < self.rebuild_flops()

    def _trainable(self) -> bool:
        for p in self.parameters():
            if p.requires_grad:
                return True
        return False

    def rank_mask(self, rank: int, like: Tensor) -> Tensor | None:
        """A training-only keep-mask over `rank` components, or None."""
        if not (self.rank_dropout and self.training_now):
            return None
        keep = (torch.rand(rank, device=like.device) >= self.rank_dropout).to(like.dtype)
        if self.rank_dropout_scale:
            keep = keep / (1.0 - self.rank_dropout)
        return keep

    def extra_repr(self) -> str:
        return f"{self.algo} on {self.host.kind} {tuple(self.host.weight.shape)}"


def adapted_parameters(
    host: HostLayer,
    adapters: list[AdapterModule],
    multipliers: list[Tensor | None],
    train: bool = False,
    inplace: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The host's weight and bias with `adapters` applied: W + Σ mᵢ·ΔWᵢ computed in the widest merge
    precision they ask for (fp32; fp64 for fp64 hosts) and cast once. The rebuild forward and
    `merge()` both use this one function, so a merged model computes with the very same bits.
    A multiplier of `None` is m = 1 exactly. `inplace` (merges, after backing the host up):
    accumulate into the host's own tensors when they are in merge precision, and return them."""
    dtype = compute_dtype(host.weight.dtype) if len(adapters) > 1 else adapters[0].merge_dtype
    for adapter in adapters:
        dtype = torch.promote_types(dtype, adapter.merge_dtype if len(adapters) == 1 else adapter.shared_merge_dtype)
    weight = host.weight.to(dtype)
    bias = None if host.bias is None else host.bias.to(dtype)
    for adapter, multiplier in zip(adapters, multipliers):
        weight = adapter.update_weight(weight, multiplier, train, inplace)
        if bias is not None:
            bias = adapter.update_bias(bias, multiplier, inplace)
    return weight.to(host.weight.dtype), None if bias is None else bias.to(host.bias.dtype)


class RankedAdapter(AdapterModule):
    """What the rank-r algorithms (LoRA, LoHa, LoKr) share: rank, α and γ (rs-LoRA), the Tucker
    flag, an optional trained scalar folded into one factor on save, and DoRA."""

    supports_dora = True

    def __init__(
        self,
        host: HostLayer,
        dim: int = 4,
        alpha: float | None = 1.0,
        *,
        use_tucker: bool = False,
        rs_lora: bool = False,
        use_scalar: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(host, **common)
        self.rank = check_dim(dim)
        self.tucker = bool(use_tucker) and host.kernel_numel > 1
        self.rs_lora = bool(rs_lora)
        self.alpha, self.scale = merge_ratio(alpha, self.rank, self.rs_lora)
        # Shape (1,), not 0-d: FSDP's fully_shard cannot shard a 0-d parameter.
        self.scalar = nn.Parameter(torch.zeros(1, **self.factory())) if use_scalar else None

    def with_scalar(self, factor: Tensor) -> Tensor:
        """`factor` times the trained scalar (as files store it), or `factor` itself."""
        return factor if self.scalar is None else factor * self.scalar

    def alpha_tensor(self) -> Tensor:
        """The per-module float32 `alpha` files carry."""
        return torch.tensor(self.alpha, dtype=torch.float32, device="cpu")

    def config(self) -> dict[str, Any]:
        return {"algo": self.algo, "dim": self.rank, "alpha": self.alpha, "use_tucker": self.tucker,
                "rs_lora": self.rs_lora, "weight_decompose": self.dora_scale is not None}


# --------------------------------------------------------------------- file validation helpers


def require_keys(tensors: Mapping[str, Tensor], name: str, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        keys = [f"{name}.{k}" for k in missing]
        raise IncompatibleFileError(f"missing {', '.join(keys)}", keys=keys)


def expect_shape(name: str, key: str, tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """`tensor` reshaped to `shape`; trailing singleton dims may be present or absent."""
    squeezed = tuple(tensor.shape)
    while len(squeezed) > 2 and squeezed[-1] == 1:
        squeezed = squeezed[:-1]
    target = tuple(shape)
    while len(target) > 2 and target[-1] == 1:
        target = target[:-1]
    if squeezed != target:
        raise ShapeMismatchError(
            f"{name}.{key}: expected shape {tuple(shape)} for this layer, found {tuple(tensor.shape)}",
            keys=[f"{name}.{key}"],
        )
    return tensor.reshape(shape)


def read_alpha(tensors: Mapping[str, Tensor], name: str, rank: int) -> float:
    """The stored `alpha` as a float32-exact Python float; the rank when absent (scale 1)."""
    if "alpha" not in tensors:
        return float(rank)
    alpha = tensors["alpha"]
    value = float(alpha.float().reshape(-1)[0]) if alpha.numel() == 1 else math.nan
    if alpha.numel() != 1 or not math.isfinite(value) or value <= 0:
        raise IncompatibleFileError(
            f"{name}.alpha: expected one finite positive number, found shape {tuple(alpha.shape)}"
            + (f" value {value}" if alpha.numel() == 1 else ""),
            keys=[f"{name}.alpha"],
        )
    return value


def float32_exact(value: float) -> float:
    """`value` rounded to float32, so scales computed from it match after a save/load round trip."""
    return struct.unpack("f", struct.pack("f", value))[0]


def merge_ratio(alpha: float | None, rank: int, rs_lora: bool = False) -> tuple[float, float]:
    """(stored alpha, scale). α = 0/None means α = r. rs-LoRA stores α·√r, so every reader's
    `alpha / r` is α/√r; the scale is always computed from the float32 stored value, so a file
    round trip reproduces it bit-exactly."""
    alpha = float(rank if alpha is None or alpha == 0 else alpha)
    stored = float32_exact(alpha * math.sqrt(rank) if rs_lora else alpha)
    return stored, stored / rank


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


def check_dim(dim: Any, what: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {dim!r}")
    return dim
