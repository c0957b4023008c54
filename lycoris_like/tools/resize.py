"""resize: a file of factored adapters (LoRA/LoCon: `modules.capabilities.Factored`) → LoRA/LoCon
at another rank, by SVD of each module's ΔW.

The SVD comes from the factors alone (two QRs and an r×r SVD, float64), so it is exact and cheap.
A module whose chosen rank is not below its current rank is copied bit-exactly. New factors keep
the module's scale α/r (α' = scale·r'), so the file reads the same in every tool; Tucker cores are
folded into `lora_down` first, DoRA magnitudes are kept. The relative error is reported per module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, IncompatibleFileError
from ..modules.capabilities import Factored
from ..modules.files import float32_exact
from .adapters import AdapterFile, build, file_weight_shape, stand_in
from .combine import is_wide_conv
from .progress import track
from .result import Result, Row, parse_dtype
from .svd import RankRule, factored_svd, relative_error

# Metadata that no longer describes the resized file.
STALE = ("sshs_model_hash", "sshs_legacy_hash", "ss_network_dim", "ss_network_alpha", "ss_output_name",
         "modelspec.title", "modelspec.hash_sha256", "lycoris_like.config", "lycoris_like.version", "modelspec.date")


def resize(
    source: Any,
    *,
    rule: RankRule,
    conv_rule: RankRule | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool | None = None,
) -> Result:
    """Change the rank of every module of a file (or network) of factored adapters by the rank rule."""
    if not isinstance(rule, RankRule):
        raise ConfigError("resize needs a RankRule (rank, energy or ratio)")
    f = AdapterFile.read(source)
    out_dtype = parse_dtype(dtype)
    others = sorted({f.algo(n).algo for n in f.modules if not issubclass(f.algo(n), Factored)})
    if others:
        raise IncompatibleFileError(
            f"{f.label}: resize changes the rank of factored adapters (LoRA/LoCon); this file holds "
            f"{', '.join(others)} (use combine --to lora to re-compress any algorithm)")
    tensors: dict[str, Tensor] = {}
    rows: list[Row] = []
    for name, group in track(list(f.modules.items()), desc="resize", enabled=progress):
        shape, _ = file_weight_shape(f.algo(name), group)
        module = build(f.algo(name), stand_in(shape, name), group, name)
        dtype_here = out_dtype or next(t.dtype for k, t in group.items() if t.is_floating_point() and k != "alpha")
        up, down = module.factors()
        u, s, vh = factored_svd(up, down)
        chosen = conv_rule if conv_rule is not None and is_wide_conv(shape) else rule
        rank = chosen.choose(s)
        if rank >= module.rank and (out_dtype is None or out_dtype == dtype_here):
            tensors.update({f"{name}.{k}": v for k, v in group.items()})
            rows.append(Row(name, "lora", module.rank, None, "kept"))
            continue
        rank = min(rank, module.rank)
        alpha = float32_exact(module.scale * rank)
        scale = alpha / rank
        root = s[:rank].sqrt()
        new_up = ((u[:, :rank] * root) / scale).reshape(shape[0], rank, *(1,) * (len(shape) - 2)).to(dtype_here).contiguous()
        new_down = (root[:, None] * vh[:rank]).reshape(rank, *shape[1:]).to(dtype_here).contiguous()
        error = relative_error(up @ down, new_up.double().reshape(shape[0], rank) * scale, new_down)
        out = {"lora_down.weight": new_down, "lora_up.weight": new_up, "alpha": torch.tensor(alpha, dtype=torch.float32)}
        note = f"{module.rank} → {rank}"
        if "dora_scale" in group:
            out["dora_scale"] = group["dora_scale"]
            note += ", DoRA magnitude kept"
        if "lora_mid.weight" in group:
            note += ", Tucker core folded"
        tensors.update({f"{name}.{k}": v for k, v in out.items()})
        rows.append(Row(name, "lora", rank, error, note))
    ranks = [r.rank for r in rows if r.rank is not None]
    config = {"algo": "lora", "dim": max(ranks), "alpha": None, "rank_rule": rule.describe(), "resized_from": f.label}
    inherited = {k: v for k, v in f.metadata.items() if k not in STALE}
    result = Result(tensors, rows, config, inherited)
    result.config["alpha"] = _common_alpha(tensors) or max(ranks)
    return result


def _common_alpha(tensors: dict[str, Tensor]) -> float | None:
    alphas = {float(t) for k, t in tensors.items() if k.endswith(".alpha")}
    return alphas.pop() if len(alphas) == 1 else None

