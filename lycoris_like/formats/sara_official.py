"""SaRA's official checkpoint (`unet.pt`) in, LyCORIS `diff` files out.

The official format (FORMATS.md §6) is a pickled dict `{'threshold': θ, 0: values, 1: …}` whose
integer keys are positions in `model.parameters()` and whose values are the parameter's entries on
the mask |P₀| < θ in C order. It is read with `torch.load(weights_only=True)` only — no arbitrary
unpickling — and mapped to parameter names of the model given, verifying the entry count of every
tensor against that model's base weights.

`export_diff` / `save_diff` write any network (SaRA, SVDiff, …) as LyCORIS `full` keys —
`diff`/`diff_b` for Linear/Conv, `w_norm`/`b_norm` for norm layers — which ComfyUI, A1111 and
LyCORIS apply as W + diff. Each difference is our merged weight minus the base, computed in float64
and rounded once: a float32 consumer's W + 1·diff reproduces our merge bit-exactly wherever a
float32 difference can, and within one ulp elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._version import __version__
from ..errors import ConfigError, CorruptFileError, IncompatibleFileError, format_keys
from ..hosts import NORMS, HostLayer, host_kind
from ..kernels import sparse
from .container import data_hash, write_safetensors
from .metadata import build_metadata

THRESHOLD_KEY = "threshold"


def read_official(path: str | os.PathLike) -> tuple[float | None, dict[int, Tensor]]:
    """(θ or None, {position: values}) from an official SaRA checkpoint, read with
    `torch.load(weights_only=True)`; a typed error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such SaRA checkpoint: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refusals and broken files come as several types
        raise CorruptFileError(f"{path}: not a SaRA checkpoint readable with weights_only=True ({exc})") from exc
    return parse_official(obj, str(path))


def parse_official(obj: Any, source: str = "SaRA checkpoint") -> tuple[float | None, dict[int, Tensor]]:
    """Validate the loaded object: a dict of int positions → 1-D float tensors (+ `threshold`)."""
    if not isinstance(obj, Mapping):
        raise CorruptFileError(f"{source}: expected a dict of parameter positions, found {type(obj).__name__}")
    threshold = None
    entries: dict[int, Tensor] = {}
    bad: list[str] = []
    for key, value in obj.items():
        if key == THRESHOLD_KEY:
            try:
                threshold = float(value)
            except (TypeError, ValueError):
                raise CorruptFileError(f"{source}: 'threshold' is not a number ({value!r})", keys=["threshold"]) from None
            continue
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            bad.append(repr(key))
            continue
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise CorruptFileError(f"{source}: entry {key} is not a float tensor", keys=[str(key)])
        if not bool(torch.isfinite(value).all()):
            raise CorruptFileError(f"{source}: entry {key} holds NaN or Inf", keys=[str(key)])
        entries[key] = value.reshape(-1)
    if bad:
        raise CorruptFileError(f"{source}: keys must be parameter positions (ints ≥ 0) or 'threshold'; found {format_keys(bad)}", keys=bad)
    return threshold, entries


def load_official(
    model: nn.Module,
    path: str | os.PathLike | Mapping[Any, Any],
    *,
    threshold: float | None = None,
    multiplier: float = 1.0,
    stack: bool = True,
) -> Any:
    """An attached SaRA network from an official `unet.pt` (or its already-loaded dict).

    Positions are mapped to `model.named_parameters()` (the order `model.parameters()` uses); θ is
    the file's `threshold`, or `threshold=` when the file has none. Every tensor's entry count must
    equal the number of this model's entries below θ — a different base, or a float16/bfloat16 copy
    of it, is refused with an `IncompatibleFileError` naming the entries. Nothing is attached
    unless every entry fits.
    """
    from ..modules.sara import SaRA
    from ..network import AdapterNetwork, Entry, check_overlap, normalize_models

    if isinstance(path, Mapping):
        file_theta, entries = parse_official(path)
        source = "SaRA checkpoint"
    else:
        file_theta, entries = read_official(path)
        source = str(path)
    theta = resolve_threshold(file_theta, threshold, source)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"load_official needs one torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    out_of_range = sorted(k for k in entries if k >= len(named))
    if out_of_range:
        keys = [str(k) for k in out_of_range]
        raise IncompatibleFileError(
            f"{source}: positions {format_keys(keys)} do not exist; the model has {len(named)} parameters "
            "(a different architecture?)",
            keys=keys,
        )
    modules = dict(model.named_modules())
    groups: dict[str, dict[str, tuple[int, Tensor]]] = {}
    unsupported = []
    for position, values in sorted(entries.items()):
        name = named[position][0]
        path_, _, attr = name.rpartition(".")
        module = modules.get(path_)
        kind = host_kind(module) if module is not None else None
        if kind is None or attr not in ("weight", "bias") or kind not in SaRA.host_kinds:
            if values.numel():
                unsupported.append(f"{position} ({name})")
            continue
        groups.setdefault(path_, {})[attr] = (position, values)
    if unsupported:
        raise IncompatibleFileError(
            f"{source}: entries for parameters no SaRA adapter can hold: {format_keys(unsupported)}", keys=unsupported
        )

    built, errors = [], []
    for path_, group in groups.items():
        if all(values.numel() == 0 for _, values in group.values()):
            for attr, (position, _) in group.items():  # nothing trained here: the model must agree
                below = sparse.count_below(getattr(modules[path_], attr), theta)
                if below:
                    errors.append((f"{position} ({path_}.{attr})", f"0 values in the file, {below} entries "
                                   f"below θ = {theta:g} in the model"))
            continue
        host = HostLayer.of(modules[path_], path_)
        adapter = SaRA(host, threshold=theta, train_bias="bias" in group and host.bias is not None,
                       train_norm=host.kind in NORMS)
        parts = {"weight": adapter.sparse_weight, "bias": adapter.sparse_bias}
        for attr, (position, values) in group.items():
            part = parts[attr]
            if part.nnz != values.numel():
                errors.append((f"{position} ({path_}.{attr})", f"{values.numel()} values in the file, {part.nnz} "
                               f"entries below θ = {theta:g} in the model"))
                continue
            part.load(values)
        built.append(Entry("", path_, adapter))
    if errors:
        keys = [k for k, _ in errors]
        details = "; ".join(f"{k}: {why}" for k, why in errors[:6])
        raise IncompatibleFileError(
            f"{source} does not fit the model (a different base, or a float16/bfloat16 copy of it — half "
            f"precision flips mask entries); nothing was changed. {details}",
            keys=keys,
        )
    if not built:
        raise IncompatibleFileError(f"{source} trains no entries")
    check_overlap(built, stack)
    models, prefixes = normalize_models(model)
    config = {"algo": "sara", "threshold": theta, "train_bias": any(e.adapter.sparse_bias is not None for e in built),
              "train_norm": any(e.adapter.host.kind in NORMS for e in built), "source": "sara-official"}
    network = AdapterNetwork(models, prefixes, built, config)
    network.set_multiplier(multiplier)
    network.attach()
    return network


def resolve_threshold(in_file: float | None, given: float | None, source: str) -> float:
    from ..modules.sara import check_threshold

    if in_file is None and given is None:
        raise ConfigError(f"{source} has no 'threshold'; pass threshold= (the θ it was trained with)")
    if in_file is not None and given is not None and check_threshold(in_file) != check_threshold(given):
        raise ConfigError(f"{source} was trained with threshold {in_file:g}, but threshold={given:g} was given")
    return check_threshold(in_file if in_file is not None else given)


# --------------------------------------------------------------------------- export as LyCORIS diff


def export_diff(network: Any, multiplier: float = 1.0) -> dict[str, Tensor]:
    """LyCORIS `full` tensors for every adapter of `network`: merged weight − base weight at
    `multiplier` (`diff`, `diff_b` when the bias changes; `w_norm`/`b_norm` on norm layers), float32
    (float64 for float64 hosts), the float64 difference rounded once (`kernels.sparse.rounded_difference`)."""
    from ..modules.base import adapted_parameters

    if getattr(network, "merged", False):
        raise ConfigError("export_diff needs the unmerged base weights; unmerge() the network first")
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, adapter in network.named_children():
            host = adapter.host
            m = torch.full_like(adapter.multiplier, float(multiplier))
            weight, bias = adapted_parameters(host, [adapter], [m])
            norm = host.kind in NORMS
            out[f"{name}.{'w_norm' if norm else 'diff'}"] = sparse.rounded_difference(host.weight, weight).cpu().contiguous()
            if bias is not None and (adapter.changes_bias or norm):
                out[f"{name}.{'b_norm' if norm else 'diff_b'}"] = sparse.rounded_difference(host.bias, bias).cpu().contiguous()
    return out


def save_diff(
    network: Any,
    path: str | os.PathLike,
    *,
    multiplier: float = 1.0,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `export_diff(network)` as a `.safetensors` file ComfyUI/A1111/LyCORIS read as `full`."""
    path = Path(path)
    tensors = export_diff(network, multiplier)
    if dtype is not None:
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    source = dict(getattr(network, "config", {}) or {})
    config = {"algo": "full", "dim": 1, "alpha": 1, "exported_from": source.get("algo"),
              **{f"source_{k}": v for k, v in source.items() if k in ("threshold", "preset")}}
    meta = build_metadata(models=network.models, config=config, output_name=path.stem,
                          model_hash=data_hash(tensors), version=__version__, extra=metadata)
    write_safetensors(path, tensors, meta)
    return path
