"""svdiff-pytorch's `spectral_shifts.safetensors` (and `spectral_shifts_te.safetensors`).

Layout (mkshing/svdiff-pytorch, `set_spectral_shifts` and its older `*ForSVDiff` models): one
float32 tensor `<module path>.delta` per adapted layer, the path as in the model's
`named_modules()` (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.delta`,
`text_model.encoder.layers.0.self_attn.q_proj.delta`); shape (min(out, in·k…),) for Linear, Conv
and Embedding (conv weights flattened `co (cin h w)`), shape [1] for LayerNorm/GroupNorm (the SVD
of γ as a 1 × C matrix). U, σ and V are never stored: they are recomputed from the base weights, so
the file carries no check that the base is the right one. No metadata.

Upstream rebuilds W' = U·diag(ReLU(σ + scale·δ))·Vh from a float32 SVD, so its weights differ from
the base by SVD round-off even at δ = 0; we add ΔW = U·diag(ReLU(σ + s·δ) − σ)·Vh to the exact base
weight instead (identical up to that round-off).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleFileError, ShapeMismatchError, format_keys
from ..hosts import NORMS, HostLayer, host_kind
from ..kernels.spectral import as_matrix
from ..modules.svdiff import SVDiff
from ..network import AdapterNetwork, Entry, check_overlap, normalize_models
from .container import read_safetensors, write_safetensors
from .naming import file_path

SUFFIX = ".delta"


def _index(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """File path → (module path, module); CLIP paths are accepted with and without `text_model.`."""
    index: dict[str, tuple[str, nn.Module]] = {}
    for path, module in model.named_modules():
        for spelled in (file_path(model, path), path):
            index.setdefault(spelled, (path, module))
            if spelled.startswith("text_model."):
                index.setdefault(spelled[len("text_model."):], (path, module))
    return index


def svdiff_pytorch_tensors(network: AdapterNetwork, key: str | None = None) -> dict[str, Tensor]:
    """The tensors of an svdiff-pytorch file for one model of `network` (float32, norms as [1])."""
    models = network.models
    if key is None:
        if len(models) != 1:
            raise ConfigError(f"svdiff-pytorch files hold one model; name it with key=, one of {sorted(models)}")
        key = next(iter(models))
    if key not in models:
        raise ConfigError(f"no model {key!r} in this network; it has {sorted(models)}")
    model = models[key]
    out: dict[str, Tensor] = {}
    wrong = []
    direct = []
    for entry in network._entries:
        if entry.key != key:
            continue
        adapter = entry.adapter
        if not isinstance(adapter, SVDiff):
            wrong.append(f"{entry.full_path} ({adapter.algo})")
            continue
        if adapter.direct:
            direct.append(entry.full_path)
            continue
        out[file_path(model, entry.path) + SUFFIX] = adapter.delta.detach().to("cpu", torch.float32).contiguous()
    if wrong:
        raise ConfigError(f"svdiff-pytorch files hold spectral shifts only; not svdiff: {format_keys(wrong)}")
    if direct:
        raise ConfigError(
            "svdiff-pytorch has one scalar shift per norm layer; these layers use one_d='direct' "
            f"(a shift per channel), which it cannot read: {format_keys(direct)}"
        )
    if not out:
        raise ConfigError(f"the network has no svdiff layers in model {key!r}")
    return out


def save_svdiff_pytorch(network: AdapterNetwork, path: str | os.PathLike, key: str | None = None) -> Path:
    """Write `network`'s shifts (of model `key` for a pipeline) as svdiff-pytorch's
    `spectral_shifts.safetensors`: `<module path>.delta`, float32. Written atomically."""
    path = Path(path)
    write_safetensors(path, svdiff_pytorch_tensors(network, key), {"format": "pt"})
    return path


def network_from_svdiff_pytorch(
    model: nn.Module,
    tensors: dict[str, Tensor],
    *,
    multiplier: float = 1.0,
    strict: bool = True,
    stack: bool = True,
    source: str = "state dict",
    **options: Any,
) -> AdapterNetwork:
    """Build and attach a network from svdiff-pytorch tensors; see `load_svdiff_pytorch`."""
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"svdiff-pytorch files describe one model (unet or text encoder); got {type(model).__name__}"
        )
    if "one_d" in options:
        raise ConfigError("one_d is read from the file (svdiff-pytorch norm layers are one_d='scalar')")
    unknown = set(options) - SVDiff.option_names()
    if unknown:
        raise ConfigError(f"unknown options for svdiff: {sorted(unknown)}; accepted: {sorted(SVDiff.option_names())}")
    index = _index(model)
    unmatched: list[str] = []
    problems: dict[str, IncompatibleFileError] = {}
    plan: list[tuple[str, str, HostLayer, Tensor]] = []
    seen: dict[str, str] = {}
    for key in sorted(tensors):
        value = tensors[key]
        if not key.endswith(SUFFIX) or key[: -len(SUFFIX)] not in index:
            unmatched.append(key)
            continue
        path, module = index[key[: -len(SUFFIX)]]
        kind = host_kind(module)
        if kind is None or kind not in SVDiff.host_kinds:
            problems[key] = IncompatibleFileError(
                f"{key}: targets {path!r}, a {type(module).__name__}, which svdiff does not adapt", keys=[key]
            )
            continue
        if path in seen:
            problems[key] = IncompatibleFileError(f"{key}: targets the same layer as {seen[path]}", keys=[key])
            continue
        seen[path] = key
        host = HostLayer.of(module, path)
        expected = (1,) if kind in NORMS else (min(as_matrix(host.weight).shape),)
        if tuple(value.shape) != expected and not (value.numel() == 1 and expected == (1,)):
            what = "svdiff-pytorch stores one scalar per norm layer" if kind in NORMS else "one per singular value"
            problems[key] = ShapeMismatchError(
                f"{key}: expected shape {expected} for {type(module).__name__}{tuple(host.weight.shape)} "
                f"({what}), found {tuple(value.shape)}",
                keys=[key],
            )
            continue
        if not value.is_floating_point():
            problems[key] = IncompatibleFileError(f"{key}: expected a float tensor, found {value.dtype}", keys=[key])
            continue
        plan.append((key, path, host, value.reshape(expected)))
    report = []
    if unmatched:
        hint = ""
        if any(k.startswith("modifier_tokens.") for k in unmatched):
            hint = (
                " (modifier_tokens.* are textual-inversion token embeddings, not spectral shifts: "
                "add them to the tokenizer and the embedding yourself)"
            )
        report.append(f"{len(unmatched)} keys match no layer of the model: {format_keys(unmatched)}{hint}")
    report.extend(str(e) for e in problems.values())
    if not plan or (strict and report):
        keys = unmatched + [k for e in problems.values() for k in e.keys]
        kinds = {type(e) for e in problems.values()}
        cls = kinds.pop() if len(kinds) == 1 and not unmatched else IncompatibleFileError
        what = "\n".join(report) if report else "it holds no spectral shifts"
        raise cls(f"{source} does not fit the model; nothing was changed.\n{what}", keys=keys)
    entries = []
    for key, path, host, value in plan:
        adapter = SVDiff(host, one_d="scalar", **options)
        with torch.no_grad():
            adapter.delta.copy_(value)
        entries.append(Entry("", path, adapter))
    check_overlap(entries, stack)
    models, prefixes = normalize_models(model)
    network = AdapterNetwork(models, prefixes, entries, {"algo": "svdiff", "one_d": "scalar", **options})
    network.set_multiplier(multiplier)
    network.attach()
    if report:
        warnings.warn(f"{source}: partial load.\n" + "\n".join(report), stacklevel=3)
    return network


def load_svdiff_pytorch(
    model: nn.Module,
    path: str | os.PathLike,
    multiplier: float = 1.0,
    *,
    strict: bool = True,
    stack: bool = True,
    **options: Any,
) -> AdapterNetwork:
    """Load svdiff-pytorch's `spectral_shifts.safetensors` onto `model` (the UNet, or the text
    encoder for `spectral_shifts_te.safetensors`) as an svdiff network and attach it.

    Every key is checked before anything changes: keys that match no layer, target a layer svdiff
    cannot adapt or have the wrong shape raise a typed error naming them (with `strict=False` the
    rest loads and a warning lists them). `options` go to every adapter (e.g. `svd_buffers="lean"`).
    The file has no base checksum; saving the network in our format adds one.
    """
    tensors, _ = read_safetensors(path)
    return network_from_svdiff_pytorch(
        model, tensors, multiplier=multiplier, strict=strict, stack=stack, source=str(path), **options
    )
