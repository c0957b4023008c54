"""extract: two checkpoints (base, tuned) → a LoRA/LoCon file by truncated SVD of each layer's
difference (float64, tall orientation), the rank set by a rule (fixed, energy or ratio).

Layers whose difference is exactly zero are skipped; 1-D weights (norms), embedding tables and
biases have no LoRA form and are reported when they changed. The relative Frobenius error of the
stored (cast) factors is reported per layer.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, IncompatibleFileError
from .base import open_base
from .combine import is_wide_conv, lora_from_dense
from .progress import track
from .result import Result, Row, parse_dtype
from .svd import RankRule


def extract(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    *,
    rule: RankRule,
    conv_rule: RankRule | None = None,
    prefix: str | None = None,
    dtype: str | torch.dtype | None = None,
    min_diff: float = 0.0,
    progress: bool | None = None,
) -> Result:
    """A LoRA/LoCon file approximating `tuned − base` layer by layer.

    `rule` sets the rank (convs with kernel > 1 use `conv_rule` when given); `prefix` names the
    model in the file for a single state dict (default: guessed — `lora_unet` for a UNet/DiT,
    `lora_te` for a CLIP text encoder, else `lycoris`); `min_diff` also skips layers with
    ‖ΔW‖ ≤ min_diff·‖W‖. Factors are stored in `dtype` (default float32) with α = rank.
    """
    if not isinstance(rule, RankRule):
        raise ConfigError("extract needs a RankRule (rank, energy or ratio)")
    out_dtype = parse_dtype(dtype) or torch.float32
    base_obj, tuned_obj = open_base(base), open_base(tuned)
    if not base_obj.stores or not tuned_obj.stores:
        raise ConfigError("extract reads two checkpoints on disk")
    tuned_by_role = {c.role: c for c in tuned_obj.components}
    tensors: dict[str, Tensor] = {}
    rows: list[Row] = []
    unchanged = 0
    pairs = []
    for comp in base_obj.components:
        other = tuned_by_role.get(comp.role)
        if other is None:
            continue
        shared = [p for p in comp.paths() if p in set(other.paths())]
        pairs.append((comp, other, shared))
    if not pairs or not any(shared for _, _, shared in pairs):
        raise IncompatibleFileError(f"{tuned} and {base} share no layers: are they the same model?")
    work = [(c, o, p) for c, o, shared in pairs for p in shared]
    for comp, other, path in track(work, desc="extract", enabled=progress):
        name = comp.name(prefix or comp.prefix or comp.fallback_prefix or "lycoris", path)
        if comp.weight_shape(path) != other.weight_shape(path):
            rows.append(Row(name, "-", note=f"skipped: shapes differ {comp.weight_shape(path)} vs {other.weight_shape(path)}"))
            continue
        (w0, b0), (w1, b1) = comp.read_layer(path), other.read_layer(path)
        if not (w0.is_floating_point() and w1.is_floating_point()):
            continue
        delta = w1.double() - w0.double()
        bias_changed = b0 is not None and b1 is not None and not torch.equal(b0, b1)
        if not bool(delta.any()):
            if bias_changed:
                rows.append(Row(name, "-", note="skipped: only the bias changed (LoRA has no bias)"))
            else:
                unchanged += 1
            continue
        if delta.dim() < 2 or comp.is_embedding(path):
            kind = "a 1-D weight (norm)" if delta.dim() < 2 else "an embedding table"
            rows.append(Row(name, "-", note=f"skipped: {kind} changed, no LoRA form (‖ΔW‖/‖W‖ = {_ratio(delta, w0):.3g})"))
            continue
        if min_diff and _ratio(delta, w0) <= min_diff:
            rows.append(Row(name, "-", note=f"skipped: ‖ΔW‖/‖W‖ = {_ratio(delta, w0):.3g} ≤ {min_diff}"))
            continue
        chosen = conv_rule if conv_rule is not None and is_wide_conv(tuple(delta.shape)) else rule
        group, rank, error = lora_from_dense(delta, chosen, out_dtype)
        for suffix, t in group.items():
            tensors[f"{name}.{suffix}"] = t
        rows.append(Row(name, "lora", rank, error, "bias changed too (not kept)" if bias_changed else ""))
    ranks = [r.rank for r in rows if r.rank is not None]
    conv_ranks = [r.rank for r, t in ((r, tensors.get(f"{r.name}.lora_down.weight")) for r in rows)
                  if t is not None and is_wide_conv(tuple(t.shape))]
    config: dict[str, Any] = {
        "algo": "lora",
        "dim": max(ranks) if ranks else None,
        "alpha": max(ranks) if ranks else None,
        "conv_dim": max(conv_ranks) if conv_ranks else None,
        "conv_alpha": max(conv_ranks) if conv_ranks else None,
        "rank_rule": rule.describe(),
        "conv_rank_rule": (conv_rule or rule).describe(),
        "extracted_from": [str(base), str(tuned)],
        "unchanged_layers": unchanged,
    }
    return Result(tensors, rows, config)


def _ratio(delta: Tensor, weight: Tensor) -> float:
    norm = float(weight.double().norm())
    return float(delta.norm()) / norm if norm else float("inf")
