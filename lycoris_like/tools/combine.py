"""combine: several adapter files (or networks) with weights → one file.

Per module, three ways:

- **native** — the algorithm's own space, exact up to one rounding per stored entry:
  LoRA/LoCon concatenates ranks (each file's wᵢ·αᵢ/rᵢ folded into its `lora_up` rows, α = Σrᵢ,
  Tucker cores block-diagonal, mixed Tucker/plain folded to plain); full/diff and (IA)³ (same
  side) sum their tensors; SVDiff sums its shifts in δ space (the paper's rule, not Σ ΔWᵢ);
  SaRA gives P₀ + Σ wᵢ·ΔPᵢ on a shared mask (needs the base); LoHa and LoKr combine only a single
  file (w folded into the first factor: a sum of Hadamard or Kronecker products is not one of the
  same rank). A single file with weight 1 is copied bit-exactly whatever the algorithm.
- **diff** — dense ΔW = Σ wᵢ·ΔWᵢ (Δb likewise) in float64, rounded once: exact for every
  algorithm, including mixed ones (weight-dependent algorithms need the base).
- **lora** — the same dense sum re-compressed by truncated SVD to a rank rule; the relative
  Frobenius error is reported per module.

`to="auto"` is native where possible, else diff.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, IncompatibleFileError, format_keys
from .adapters import AdapterFile, Hosts, build
from .base import open_base
from .progress import track
from .result import Result, Row, inherit_base_metadata, parse_dtype
from .svd import RankRule, lowrank, relative_error

MODES = ("auto", "native", "diff", "lora")


class NotNative(Exception):
    """A module that its algorithm's own space cannot hold exactly."""


Part = tuple[float, AdapterFile]


def _group(part: Part, name: str) -> dict[str, Tensor]:
    return part[1].modules[name]


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).contiguous()


# --------------------------------------------------------------------------- native combiners


def _lora(name: str, parts: list[Part], hosts: Hosts, files: list[AdapterFile], dtype: torch.dtype) -> tuple[dict[str, Tensor], int]:
    if any("dora_scale" in _group(p, name) for p in parts):
        raise NotNative("DoRA is not linear in its factors")
    mods = [build(f.algo(name), hosts.host(name, f, files), f.modules[name], name) for _, f in parts]
    if len(parts) == 1:  # keep the rank and alpha: fold w into up
        (w, f), mod = parts[0], mods[0]
        out = dict(f.modules[name])
        out["lora_up.weight"] = _cast(f.modules[name]["lora_up.weight"].double() * w, dtype)
        return out, mod.rank
    ups, downs, mids = [], [], []
    tucker = all(m.lora_mid is not None for m in mods)
    for (w, _), mod in zip(parts, mods):
        up = mod.lora_up.weight.double() * (w * mod.scale)
        down = mod.lora_down.weight.double()
        if mod.lora_mid is not None and not tucker:  # fold the core: ΔW = up · (mid ×₂ down)
            mid = mod.lora_mid.weight.double()
            down = torch.einsum("ij...,jq->iq...", mid, down.reshape(down.shape[0], down.shape[1]))
        ups.append(up)
        downs.append(down)
        mids.append(None if mod.lora_mid is None else mod.lora_mid.weight.double())
    if len({tuple(d.shape[1:]) for d in downs}) != 1 or len({(u.shape[0], *u.shape[2:]) for u in ups}) != 1:
        raise IncompatibleFileError(f"{name}: the files' factor shapes do not fit one layer", keys=[name])
    rank = sum(d.shape[0] for d in downs)
    out = {"lora_up.weight": _cast(torch.cat(ups, 1), dtype), "lora_down.weight": _cast(torch.cat(downs, 0), dtype),
           "alpha": torch.tensor(float(rank), dtype=torch.float32)}
    if tucker:
        kernel = mids[0].shape[2:]
        core = torch.zeros(rank, rank, *kernel, dtype=torch.float64)
        at = 0
        for mid in mids:
            r = mid.shape[0]
            core[at:at + r, at:at + r] = mid
            at += r
        out["lora_mid.weight"] = _cast(core, dtype)
    return out, rank


def _summed(keys: tuple[str, ...]) -> Callable[..., tuple[dict[str, Tensor], None]]:
    """A combiner for algorithms linear in their tensors (`keys`; the first is required)."""

    def combine(name: str, parts: list[Part], hosts: Hosts, files: list[AdapterFile], dtype: torch.dtype) -> tuple[dict[str, Tensor], None]:
        out: dict[str, Tensor] = {}
        first = _group(parts[0], name)
        for key in keys:
            present = [(w, _group((w, f), name)[key]) for w, f in parts if key in f.modules[name]]
            if not present:
                continue
            shapes = {tuple(t.shape) for _, t in present}
            if len(shapes) != 1:
                raise IncompatibleFileError(f"{name}.{key}: shapes differ between files: {sorted(shapes)}", keys=[f"{name}.{key}"])
            total = sum(w * t.double() for w, t in present)
            out[key] = _cast(total, dtype)
        for key, value in first.items():  # flags and the like, equal in every part
            if key not in out:
                out[key] = value
        return out, None

    return combine


def _ia3(name: str, parts: list[Part], hosts: Hosts, files: list[AdapterFile], dtype: torch.dtype) -> tuple[dict[str, Tensor], None]:
    sides = {int(_group(p, name)["on_input"].reshape(-1)[0]) for p in parts}
    if len(sides) != 1:
        raise NotNative("(IA)³ vectors on the input and on the output side do not add")
    return _summed(("weight",))(name, parts, hosts, files, dtype)


def _first_factor(key_options: tuple[str, ...]) -> Callable[..., tuple[dict[str, Tensor], int | None]]:
    """One file only: w folded into the first factor (linear in it), everything else copied."""

    def combine(name: str, parts: list[Part], hosts: Hosts, files: list[AdapterFile], dtype: torch.dtype) -> tuple[dict[str, Tensor], int | None]:
        if len(parts) > 1:
            raise NotNative("a sum of several is not one of the same form and rank")
        (w, f), = parts
        group = f.modules[name]
        if "dora_scale" in group:
            raise NotNative("DoRA is not linear in its factors")
        key = next(k for k in key_options if k in group)
        out = dict(group)
        out[key] = _cast(group[key].double() * w, dtype)
        return out, None

    return combine


def _svdiff(name: str, parts: list[Part], hosts: Hosts, files: list[AdapterFile], dtype: torch.dtype) -> tuple[dict[str, Tensor], None]:
    """SVDiff combines in δ space: ReLU(σ + Σ wᵢ·δᵢ) (the paper's rule; the multiplier sits inside
    the ReLU, so this is not Σ wᵢ·ΔWᵢ where σ + δ clips). All files must share the base."""
    groups = [_group(p, name) for p in parts]
    keys = {("gain_delta" if "gain_delta" in g else "delta") for g in groups}
    if len(keys) != 1:
        raise NotNative("spectral (delta) and direct norm (gain_delta) shifts do not add")
    hashes = {int(g["base_hash"].reshape(-1)[0]) for g in groups if "base_hash" in g}
    if len(hashes) > 1:
        raise NotNative("the files were trained on different base weights (base_hash differs)")
    return _summed((keys.pop(),))(name, parts, hosts, files, dtype)


def _sara(name: str, parts: list[Part], hosts: Hosts, files: list[AdapterFile], dtype: torch.dtype) -> tuple[dict[str, Tensor], None]:
    """SaRA: P₀ + Σ wᵢ·ΔPᵢ on the shared mask, ΔPᵢ = vᵢ − P₀ (float64, rounded once). Files of
    different θ (nested masks) go dense instead."""
    if not hosts.has_base(name):
        raise NotNative("SaRA stores trained values, so combining needs the base weights (--base)")
    groups = [_group(p, name) for p in parts]
    host = hosts.host(name, parts[0][1], files)
    out = dict(groups[0])
    for values_key, index_key, base in (("sara_values", "sara_indices", host.weight), ("sara_b_values", "sara_b_indices", host.bias)):
        present = [g for g in groups if values_key in g]
        if not present:
            continue
        if len(present) != len(groups) or any(not torch.equal(g[index_key], groups[0][index_key]) for g in groups):
            raise NotNative("the files select different entries (another θ)")
        index = groups[0][index_key].long()
        p0 = base.detach().reshape(-1)[index].double()
        total = p0 + sum(w * (g[values_key].double() - p0) for (w, _), g in zip(parts, groups))
        out[values_key] = total.to(groups[0][values_key].dtype)
    return out, None


NATIVE: dict[str, Callable[..., tuple[dict[str, Tensor], int | None]]] = {
    "svdiff": _svdiff,
    "sara": _sara,
    "lora": _lora,
    "full": _summed(("diff", "diff_b")),
    "ia3": _ia3,
    "loha": _first_factor(("hada_w1_a",)),
    "lokr": _first_factor(("lokr_w1", "lokr_w1_a")),
}


def _native(name: str, parts: list[Part], hosts: Hosts, files: list[AdapterFile], dtype: torch.dtype) -> tuple[dict[str, Tensor], str, int | None]:
    algos = {f.algo(name).algo for _, f in parts}
    if len(algos) > 1:
        raise NotNative(f"mixed algorithms ({', '.join(sorted(algos))})")
    algo = algos.pop()
    if len(parts) == 1 and parts[0][0] == 1.0:
        group = parts[0][1].modules[name]
        rank = getattr(build(parts[0][1].algo(name), hosts.host(name, parts[0][1], files), group, name), "rank", None) \
            if parts[0][1].weight_free(name) or hosts.has_base(name) else None
        return dict(group), algo, rank
    combiner = NATIVE.get(algo)
    if combiner is None:
        raise NotNative(f"{algo} has no native combination here")
    out, rank = combiner(name, parts, hosts, files, dtype)
    return out, algo, rank


# --------------------------------------------------------------------------- dense


def dense_delta(name: str, parts: list[Part], hosts: Hosts, files: list[AdapterFile]) -> tuple[Tensor, Tensor | None]:
    """Σ wᵢ·ΔWᵢ and Σ wᵢ·Δbᵢ in float64, each ΔW from the algorithm's own `delta_weight()` (or
    `scaled_delta` where the multiplier is not a plain factor, e.g. SVDiff)."""
    weight: Tensor | None = None
    bias: Tensor | None = None
    for w, f in parts:
        module = build(f.algo(name), hosts.host(name, f, files), f.modules[name], name)
        if module.linear_in_multiplier:
            dw = module.delta_weight().double() * w
            db = module.delta_bias()
            db = None if db is None else db.double() * w
        else:
            m = torch.tensor(w, dtype=torch.float32)
            dw = module.scaled_delta(m).double()
            db = module.scaled_delta_bias(m)
            db = None if db is None else db.double()
        weight = dw if weight is None else weight + dw
        if db is not None:
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
