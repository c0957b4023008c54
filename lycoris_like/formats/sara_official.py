"""SaRA's official checkpoint (`unet.pt`) → our `sara` file tensors.

The official format (FORMATS.md §6) is a pickled dict `{'threshold': θ, 0: values, 1: …}` whose
integer keys are positions in `model.parameters()` and whose values are the parameter's entries on
the mask |P₀| < θ in C order. It is read with `torch.load(weights_only=True)` only — no arbitrary
unpickling. `to_ours` maps the positions to the model's parameters, checks every tensor's entry
count against that model's base weights (naming positions in its errors) and writes our keys —
values, indices, counts, checksums — which `lycoris_like.interop.load_official` feeds to the one
loader. A pure translator: it reads the model's structure and weights, and builds nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, CorruptFileError, IncompatibleFileError, format_keys
from ..hosts import LINEAR_AND_CONV, NORMS, compute_dtype, host_kind
from ..kernels import sparse
from .naming import module_name

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


def to_ours(model: nn.Module, entries: Mapping[int, Tensor], theta: float, source: str, prefix: str
            ) -> dict[str, Tensor]:
    """Our sara tensors (`<prefix>_<path>.sara_values`, `…sara_indices`, …) for the official
    `entries` ({position in model.parameters(): values}) at θ, every count checked against the
    model; typed errors name the positions."""
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
        path, _, attr = name.rpartition(".")
        module = modules.get(path)
        kind = host_kind(module) if module is not None else None
        if kind not in LINEAR_AND_CONV | NORMS or attr not in ("weight", "bias"):
            if values.numel():
                unsupported.append(f"{position} ({name})")
            continue
        groups.setdefault(path, {})[attr] = (position, values)
    if unsupported:
        raise IncompatibleFileError(
            f"{source}: entries for parameters no SaRA adapter can hold: {format_keys(unsupported)}", keys=unsupported)

    out: dict[str, Tensor] = {}
    errors: list[tuple[str, str]] = []
    for path, group in groups.items():
        module = modules[path]
        if all(values.numel() == 0 for _, values in group.values()):
            for attr, (position, _) in group.items():  # nothing trained here: the model must agree
                below = sparse.count_below(getattr(module, attr), theta)
                if below:
                    errors.append((f"{position} ({path}.{attr})", f"0 values in the file, {below} entries "
                                   f"below θ = {theta:g} in the model"))
            continue
        name = module_name(prefix, model, path)
        parts = [("weight", "sara_")] + ([("bias", "sara_b_")] if "bias" in group and module.bias is not None else [])
        for attr, key in parts:
            tensor = getattr(module, attr)
            index = sparse.select_indices(tensor, theta)
            position, values = group.get(attr, (None, tensor.new_zeros(0)))
            if index.numel() != values.numel():
                where = f"{position} ({path}.{attr})" if position is not None else f"({path}.{attr})"
                errors.append((where, f"{values.numel()} values in the file, {index.numel()} entries "
                               f"below θ = {theta:g} in the model"))
                continue
            base = sparse.gather(tensor, index, compute_dtype(tensor.dtype))
            out[f"{name}.{key}values"] = values
            out[f"{name}.{key}indices"] = index.to(sparse.INDEX_DTYPE)
            out[f"{name}.{key}nnz"] = torch.tensor(index.numel(), dtype=torch.int64)
            out[f"{name}.{key}checksum"] = torch.tensor(sparse.checksum(base), dtype=torch.int64)
        out[f"{name}.sara_threshold"] = torch.tensor(theta, dtype=torch.float32)
    if errors:
        keys = [k for k, _ in errors]
        details = "; ".join(f"{k}: {why}" for k, why in errors[:6])
        raise IncompatibleFileError(
            f"{source} does not fit the model (a different base, or a float16/bfloat16 copy of it — half "
            f"precision flips mask entries); nothing was changed. {details}",
            keys=keys,
        )
    if not out:
        raise IncompatibleFileError(f"{source} trains no entries")
    return out


def resolve_threshold(in_file: float | None, given: float | None, source: str) -> float:
    """θ from the file or the caller (they must agree when both are given), float32-exact."""
    check_threshold = sparse.check_threshold
    if in_file is None and given is None:
        raise ConfigError(f"{source} has no 'threshold'; pass threshold= (the θ it was trained with)")
    if in_file is not None and given is not None and check_threshold(in_file) != check_threshold(given):
        raise ConfigError(f"{source} was trained with threshold {in_file:g}, but threshold={given:g} was given")
    return check_threshold(in_file if in_file is not None else given)
