"""Helpers for reading an algorithm's tensors from a file: presence, shapes, `alpha`, typed errors."""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..errors import ConfigError, IncompatibleFileError, ShapeMismatchError


def require_keys(tensors: Mapping[str, Tensor], name: str, keys: tuple[str, ...]) -> None:
    """Raise `IncompatibleFileError` naming every `name.<key>` of `keys` that is missing."""
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


def check_dim(dim: Any, what: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {dim!r}")
    return dim
