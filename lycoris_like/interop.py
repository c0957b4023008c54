"""Other tools' files onto and from networks: svdiff-pytorch, the official SaRA checkpoint, and
LyCORIS `diff` exports of any network.

The formats themselves are pure name/tensor translators (`formats.svdiff_pytorch`,
`formats.sara_official`); this module feeds them to the one loader (`network_from_tensors`) and
reads networks back out through their file tensors.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._version import __version__
from .errors import ConfigError, IncompatibleFileError
from .formats import sara_official, svdiff_pytorch
from .formats.container import data_hash, read_safetensors, write_safetensors
from .formats.metadata import OUR_PREFIX, build_metadata
from .formats.naming import default_prefix
from .hosts import NORMS
from .kernels import sparse
from .loading import network_from_tensors
from .modules.compose import adapted_parameters
from .network import AdapterNetwork


def _config(config: Mapping[str, Any]) -> dict[str, str]:
    return {OUR_PREFIX + "config": json.dumps(dict(config), sort_keys=True)}


# --------------------------------------------------------------------------- svdiff-pytorch


def network_from_svdiff_pytorch(model: nn.Module, tensors: Mapping[str, Tensor], *, multiplier: float = 1.0,
                                strict: bool = True, stack: bool = True, source: str = "state dict",
                                **options: Any) -> AdapterNetwork:
    """Build and attach an svdiff network from svdiff-pytorch tensors; see `load_svdiff_pytorch`."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"svdiff-pytorch files describe one model (unet or text encoder); got {type(model).__name__}")
    if "one_d" in options:
        raise ConfigError("one_d is read from the file (svdiff-pytorch norm layers are one_d='scalar')")
    ours, unmatched, problems = svdiff_pytorch.to_ours(model, tensors, default_prefix(model))
    report = ([svdiff_pytorch.describe_unmatched(unmatched)] if unmatched else []) + [str(e) for e in problems]
    if not ours or (strict and report):
        keys = unmatched + [k for e in problems for k in e.keys]
        kinds = {type(e) for e in problems}
        cls = kinds.pop() if len(kinds) == 1 and not unmatched else IncompatibleFileError
        what = "\n".join(report) if report else "it holds no spectral shifts"
        raise cls(f"{source} does not fit the model; nothing was changed.\n{what}", keys=keys)
    network = network_from_tensors(model, ours, _config({"algo": "svdiff", "one_d": "scalar"}), multiplier=multiplier,
                                   stack=stack, source=source, **options)
    if report:
        warnings.warn(f"{source}: partial load.\n" + "\n".join(report), stacklevel=3)
    return network


def load_svdiff_pytorch(model: nn.Module, path: str | os.PathLike, multiplier: float = 1.0, *, strict: bool = True,
                        stack: bool = True, **options: Any) -> AdapterNetwork:
    """Load svdiff-pytorch's `spectral_shifts.safetensors` onto `model` (the UNet, or the text
    encoder for `spectral_shifts_te.safetensors`) as an svdiff network and attach it.

    Every key is checked before anything changes: keys that match no layer, target a layer svdiff
    cannot adapt or have the wrong shape raise a typed error naming them (with `strict=False` the
    rest loads and a warning lists them). `options` go to every adapter (e.g. `svd_buffers="lean"`).
    The file has no base checksum; saving the network in our format adds one.
    """
    tensors, _ = read_safetensors(path)
    return network_from_svdiff_pytorch(model, tensors, multiplier=multiplier, strict=strict, stack=stack,
                                       source=str(path), **options)


def svdiff_pytorch_tensors(network: AdapterNetwork, key: str | None = None) -> dict[str, Tensor]:
    """The tensors of an svdiff-pytorch file for one model of `network` (float32, norms as [1])."""
    models = network.models
    if key is None:
        if len(models) != 1:
            raise ConfigError(f"svdiff-pytorch files hold one model; name it with key=, one of {sorted(models)}")
        key = next(iter(models))
    if key not in models:
        raise ConfigError(f"no model {key!r} in this network; it has {sorted(models)}")
    prefix = network.prefixes[key]
    tensors = {k: v for k, v in network.file_state_dict().items() if k.startswith(prefix + "_") or k.startswith(prefix + ".")}
    if not tensors:
        raise ConfigError(f"the network has no svdiff layers in model {key!r}")
    return svdiff_pytorch.from_ours(models[key], tensors, prefix)


def save_svdiff_pytorch(network: AdapterNetwork, path: str | os.PathLike, key: str | None = None) -> Path:
    """Write `network`'s shifts (of model `key` for a pipeline) as svdiff-pytorch's
    `spectral_shifts.safetensors`: `<module path>.delta`, float32. Written atomically."""
    path = Path(path)
    write_safetensors(path, svdiff_pytorch_tensors(network, key), {"format": "pt"})
    return path


# --------------------------------------------------------------------------- SaRA official


def load_official(model: nn.Module, path: str | os.PathLike | Mapping[Any, Any], *, threshold: float | None = None,
                  multiplier: float = 1.0, stack: bool = True) -> AdapterNetwork:
    """An attached SaRA network from an official `unet.pt` (or its already-loaded dict).

    Positions are mapped to `model.named_parameters()` (the order `model.parameters()` uses); θ is
    the file's `threshold`, or `threshold=` when the file has none. Every tensor's entry count must
    equal the number of this model's entries below θ — a different base, or a float16/bfloat16 copy
    of it, is refused with an `IncompatibleFileError` naming the entries. Nothing is attached
    unless every entry fits.
    """
    if isinstance(path, Mapping):
        file_theta, entries = sara_official.parse_official(path)
        source = "SaRA checkpoint"
    else:
        file_theta, entries = sara_official.read_official(path)
        source = str(path)
    theta = sara_official.resolve_threshold(file_theta, threshold, source)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"load_official needs one torch.nn.Module, got {type(model).__name__}")
    tensors = sara_official.to_ours(model, entries, theta, source, default_prefix(model))
    train_bias = any(k.endswith(".sara_b_values") for k in tensors)
    config = {"algo": "sara", "threshold": theta, "train_bias": train_bias, "source": "sara-official"}
    return network_from_tensors(model, tensors, _config(config), multiplier=multiplier, stack=stack, source=source)


# --------------------------------------------------------------------------- export as LyCORIS diff


def export_diff(network: AdapterNetwork, multiplier: float = 1.0) -> dict[str, Tensor]:
    """LyCORIS `full` tensors for every adapter of `network`: merged weight − base weight at
    `multiplier` (`diff`, `diff_b` when the bias changes; `w_norm`/`b_norm` on norm layers), float32
    (float64 for float64 hosts), the float64 difference rounded once (`kernels.sparse.rounded_difference`):
    a float32 consumer's W + 1·diff reproduces our merge bit-exactly wherever a float32 difference
    can, and within one ulp elsewhere."""
    if network.merged:
        raise ConfigError("export_diff needs the unmerged base weights; unmerge() the network first")
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, adapter in network.named_children():
            host = adapter.host
            weight, bias = adapted_parameters(host, [adapter], [float(multiplier)])
            norm = host.kind in NORMS
            out[f"{name}.{'w_norm' if norm else 'diff'}"] = sparse.rounded_difference(host.weight, weight).cpu().contiguous()
            if bias is not None and (adapter.changes_bias or norm):
                out[f"{name}.{'b_norm' if norm else 'diff_b'}"] = sparse.rounded_difference(host.bias, bias).cpu().contiguous()
    return out


def save_diff(network: AdapterNetwork, path: str | os.PathLike, *, multiplier: float = 1.0,
              dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write `export_diff(network)` as a `.safetensors` file ComfyUI/A1111/LyCORIS read as `full`."""
    path = Path(path)
    tensors = export_diff(network, multiplier)
    if dtype is not None:
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    source = dict(network.config or {})
    config = {"algo": "full", "dim": 1, "alpha": 1, "exported_from": source.get("algo"),
              **{f"source_{k}": v for k, v in source.items() if k in ("threshold", "preset")}}
    meta = build_metadata(models=network.models, config=config, output_name=path.stem,
                          model_hash=data_hash(tensors), version=__version__, extra=metadata)
    write_safetensors(path, tensors, meta)
    return path
