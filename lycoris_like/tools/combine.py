"""combine: several adapter files (or networks) with weights → one file.

Per module, three ways:

- **native** — the algorithm's own space (its `NativeCombine.combine_native`), exact up to one
  rounding per stored entry: LoRA/LoCon concatenates ranks, full/diff and (IA)³ sum their tensors,
  SVDiff sums its shifts in δ space (the paper's rule, not Σ ΔWᵢ), SaRA gives P₀ + Σ wᵢ·ΔPᵢ on a
  shared mask (needs the base), LoHa and LoKr fold a single file's weight into their first factor.
  A single file with weight 1 is copied bit-exactly whatever the algorithm.
- **diff** — dense ΔW = Σ wᵢ·ΔWᵢ (Δb likewise) in float64, rounded once: exact for every
  algorithm, including mixed ones (weight-dependent algorithms need the base).
- **lora** — the same dense sum re-compressed by truncated SVD to a rank rule; the relative
  Frobenius error is reported per module.

`to="auto"` is native where possible, else diff.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, IncompatibleFileError, format_keys
from ..modules.capabilities import NativeCombine, NonlinearMultiplier, NotNative
from .adapters import AdapterFile, Hosts, build
from .base import open_base
from .progress import track
from .result import Result, Row, inherit_base_metadata, parse_dtype
from .svd import RankRule, lowrank, relative_error

MODES = ("auto", "native", "diff", "lora")


Part = tuple[float, AdapterFile]


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).contiguous()


def _native(name: str, parts: list[Part], hosts: Hosts, files: list[AdapterFile], dtype: torch.dtype) -> tuple[dict[str, Tensor], str, int | None]:
    """The algorithm's own combination (`NativeCombine`), or `NotNative`. A single file with
    weight 1 is copied bit-exactly whatever the algorithm."""
    classes = {f.algo(name) for _, f in parts}
    algos = {cls.algo for cls in classes}
    if len(algos) > 1:
        raise NotNative(f"mixed algorithms ({', '.join(sorted(algos))})")
    algo = algos.pop()
    cls = next(iter(classes)) if len(classes) == 1 else None
    owner = {id(f.modules[name]): f for _, f in parts}

    def build_part(tensors: Mapping[str, Tensor]) -> Any:
        return build(owner[id(tensors)].algo(name), hosts.host(name, owner[id(tensors)], files), tensors, name)

    if len(parts) == 1 and parts[0][0] == 1.0:
        f = parts[0][1]
        rank = getattr(build_part(f.modules[name]), "rank", None) if f.weight_free(name) or hosts.has_base(name) else None
        return dict(f.modules[name]), algo, rank
    if cls is None or not issubclass(cls, NativeCombine):
        raise NotNative(f"{algo} has no native combination here" if cls is not None else "mixed variants")
    base = hosts.host(name, parts[0][1], files) if hosts.has_base(name) else None
    try:
        out, rank = cls.combine_native([(w, f.modules[name]) for w, f in parts], build_part, base, dtype)
    except IncompatibleFileError as exc:
        raise IncompatibleFileError(f"{name}: {exc}", keys=[name]) from exc
    return out, algo, rank


# --------------------------------------------------------------------------- dense


def dense_delta(name: str, parts: list[Part], hosts: Hosts, files: list[AdapterFile]) -> tuple[Tensor, Tensor | None]:
    """Σ wᵢ·ΔWᵢ and Σ wᵢ·Δbᵢ in float64, each ΔW from the algorithm's own `delta_weight()` (or
    its `delta_at(w)` where the weight is not a plain factor: `NonlinearMultiplier`, SVDiff)."""
    weight: Tensor | None = None
    bias: Tensor | None = None
    with torch.no_grad():
        for w, f in parts:
            module = build(f.algo(name), hosts.host(name, f, files), f.modules[name], name)
            if isinstance(module, NonlinearMultiplier):
                dw = module.delta_at(w).double()
            else:
                dw = module.delta_weight().double() * w
            weight = dw if weight is None else weight + dw
            db = module.delta_bias()
            if db is not None:
                db = db.double() * w
                bias = db if bias is None else bias + db
    assert weight is not None
    return weight, bias


def lora_from_dense(delta: Tensor, rule: RankRule, dtype: torch.dtype) -> tuple[dict[str, Tensor], int, float]:
    """LoRA/LoCon factors of a dense ΔW by truncated SVD (α = rank, so scale 1), and the relative
    error of the stored (cast) factors."""
    flat = delta.reshape(delta.shape[0], -1)
    low = lowrank(flat, rule)
    ones = (1,) * (delta.dim() - 2)
    up = _cast(low.up.reshape(delta.shape[0], low.rank, *ones), dtype)
    down = _cast(low.down.reshape(low.rank, *delta.shape[1:]), dtype)
    error = relative_error(flat, up, down)
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(low.rank), dtype=torch.float32)}, low.rank, error


def is_wide_conv(shape: tuple[int, ...]) -> bool:
    return len(shape) > 2 and math.prod(shape[2:]) > 1


# --------------------------------------------------------------------------- entry point


def combine(
    inputs: Sequence[tuple[Any, float]] | Sequence[Any],
    *,
    to: str = "auto",
    rule: RankRule | None = None,
    conv_rule: RankRule | None = None,
    base: Any = None,
    dtype: str | torch.dtype | None = None,
    strict: bool = True,
    progress: bool | None = None,
) -> Result:
    """Combine adapter files or networks, each with a weight (`[(path, 0.7), (net, 0.3)]`; a bare
    source means weight 1), into one file's tensors. See the module docstring for the modes.

    `rule`/`conv_rule` set the rank for `to="lora"` (convs with kernel > 1 use `conv_rule` when
    given). `base` (a model, checkpoint file or diffusers folder) is needed for algorithms whose ΔW
    depends on the base weights ((IA)³, DoRA, SVDiff, SaRA) and to know the layer shape of LoHa and
    low-rank LoKr convs when writing dense or SVD results; networks given as inputs bring their model.
    """
    if to not in MODES:
        raise ConfigError(f"to must be one of {MODES}, got {to!r}")
    if to == "lora" and rule is None:
        raise ConfigError("to='lora' needs a rank rule (rank, energy or ratio)")
    pairs = [(item if isinstance(item, tuple) else (item, 1.0)) for item in inputs]
    if not pairs:
        raise ConfigError("combine needs at least one input")
    files = []
    weights = []
    for source, weight in pairs:
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"weight of {source} must be a number, got {weight!r}") from None
        if not math.isfinite(w):
            raise ConfigError(f"weight of {source} must be finite, got {weight!r}")
        files.append(AdapterFile.read(source))
        weights.append(w)
    if base is None:
        base = next((f.network for f in files if f.network is not None), None)
    names = list(dict.fromkeys(n for f in files for n in f.modules))
    located = {}
    if base is not None:
        base = open_base(base)
        located, unmatched = base.resolve(names)
        if unmatched and strict:
            raise IncompatibleFileError(
                f"{len(unmatched)} modules match no layer of the base {base.source}: {format_keys(unmatched)}", keys=unmatched
            )
    hosts = Hosts(located)
    out_dtype = parse_dtype(dtype) or _widest(files)

    tensors: dict[str, Tensor] = {}
    rows: list[Row] = []
    for name in track(names, desc="combine", enabled=progress):
        parts = [(w, f) for w, f in zip(weights, files) if name in f.modules]
        if all(w == 0.0 for w, _ in parts):
            rows.append(Row(name, "-", note="skipped: weight 0"))
            continue
        group: dict[str, Tensor] | None = None
        note = ""
        if to in ("auto", "native"):
            try:
                group, algo, rank = _native(name, parts, hosts, files, out_dtype)
                rows.append(Row(name, algo, rank, None, "native" if len(parts) > 1 else ""))
            except NotNative as why:
                if to == "native":
                    raise IncompatibleFileError(f"{name}: cannot combine natively: {why}; use to='diff' or 'lora'", keys=[name]) from None
                note = f"diff ({why})"
        if group is None:
            for _, f in parts:
                if not (f.weight_free(name) or hosts.has_base(name)):
                    hosts.host(name, f, files)  # raises: ΔW needs the base weights
            shape = hosts.shape(name, files)
            if shape is None or not shape[1]:
                raise IncompatibleFileError(
                    f"{name}: the layer's shape is not certain from the files (LoHa/LoKr store convs flattened); "
                    "give the base model (--base)", keys=[name])
            delta, delta_b = dense_delta(name, parts, hosts, files)
            if to == "lora" and delta.dim() > 1:
                if not bool(delta.any()):
                    rows.append(Row(name, "-", note="skipped: ΔW = 0"))
                    continue
                chosen = conv_rule if conv_rule is not None and is_wide_conv(tuple(delta.shape)) else rule
                group, rank, error = lora_from_dense(delta, chosen, out_dtype)
                dropped = "" if delta_b is None or not bool(delta_b.any()) else f"Δb dropped (‖Δb‖ = {float(delta_b.norm()):.3g})"
                rows.append(Row(name, "lora", rank, error, dropped))
            else:
                weight_key, bias_key = ("w_norm", "b_norm") if delta.dim() == 1 else ("diff", "diff_b")  # LyCORIS's norm keys
                group = {weight_key: _cast(delta, out_dtype)}
                if delta_b is not None:
                    group[bias_key] = _cast(delta_b, out_dtype)
                if to == "lora":
                    note = "1-D weight (norm): kept dense"
                rows.append(Row(name, "full", None, None, note))
        hosts.release(name)
        for suffix, tensor in group.items():
            tensors[f"{name}.{suffix}"] = tensor
    algos = sorted({r.algo for r in rows if r.algo != "-"})
    ranks = [r.rank for r in rows if r.rank is not None]
    config = {
        "algo": algos[0] if len(algos) == 1 else "mixed",
        "dim": max(ranks) if ranks else None,
        "alpha": max(ranks) if ranks else None,
        "combined_from": [f"{f.label} × {w:g}" for f, w in zip(files, weights)],
        "mode": to,
    }
    if to == "lora":
        config["rank_rule"] = rule.describe() if rule else None
    return Result(tensors, rows, config, inherit_base_metadata(f.metadata for f in files))


def _widest(files: list[AdapterFile]) -> torch.dtype:
    """The widest floating dtype among the inputs' factors (alpha excluded)."""
    dtype = None
    for f in files:
        for key, t in f.tensors.items():
            if t.is_floating_point() and not key.endswith(".alpha"):
                dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype or torch.float32
