"""svdiff-pytorch's `spectral_shifts.safetensors` (and `spectral_shifts_te.safetensors`) ↔ our keys.

Layout (mkshing/svdiff-pytorch, `set_spectral_shifts` and its older `*ForSVDiff` models): one
float32 tensor `<module path>.delta` per adapted layer, the path as in the model's
`named_modules()` (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.delta`,
`text_model.encoder.layers.0.self_attn.q_proj.delta`); shape (min(out, in·k…),) for Linear, Conv
and Embedding (conv weights flattened `co (cin h w)`), shape [1] for LayerNorm/GroupNorm (the SVD
of γ as a 1 × C matrix). U, σ and V are never stored: they are recomputed from the base weights, so
the file carries no check that the base is the right one. No metadata.

A pure translator: `to_ours` checks every key against the model (naming upstream's keys in its
errors) and renames them to our file names — `lycoris_like.interop` feeds the result to the one
loader; `from_ours` goes back from our file tensors. Upstream rebuilds W' = U·diag(ReLU(σ +
scale·δ))·Vh from a float32 SVD, so its weights differ from the base by SVD round-off even at
δ = 0; we add ΔW = U·diag(ReLU(σ + s·δ) − σ)·Vh to the exact base weight instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleFileError, ShapeMismatchError, format_keys
from ..hosts import NORMS, host_kind
from ..kernels.spectral import as_matrix
from .naming import accepted_names, file_path, module_name

SUFFIX = ".delta"
OUR_KEYS = ("delta", "base_hash")
SVDIFF_KINDS = frozenset({"linear", "conv1d", "conv2d", "conv3d", "embedding"}) | NORMS


def _index(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """File path → (module path, module); CLIP paths are accepted with and without `text_model.`."""
    index: dict[str, tuple[str, nn.Module]] = {}
    for path, module in model.named_modules():
        for spelled in (file_path(model, path), path):
            index.setdefault(spelled, (path, module))
            if spelled.startswith("text_model."):
                index.setdefault(spelled[len("text_model."):], (path, module))
    return index


def to_ours(model: nn.Module, tensors: Mapping[str, Tensor], prefix: str,
            ) -> tuple[dict[str, Tensor], list[str], list[IncompatibleFileError]]:
    """(our tensors `<prefix>_<path>.delta`, upstream keys that match no layer, per-key problems)."""
    index = _index(model)
    unmatched: list[str] = []
    problems: list[IncompatibleFileError] = []
    out: dict[str, Tensor] = {}
    seen: dict[str, str] = {}
    for key in sorted(tensors):
        value = tensors[key]
        if not key.endswith(SUFFIX) or key[: -len(SUFFIX)] not in index:
            unmatched.append(key)
            continue
        path, module = index[key[: -len(SUFFIX)]]
        kind = host_kind(module)
        if kind not in SVDIFF_KINDS:
            problems.append(IncompatibleFileError(
                f"{key}: targets {path!r}, a {type(module).__name__}, which svdiff does not adapt", keys=[key]))
            continue
        if path in seen:
            problems.append(IncompatibleFileError(f"{key}: targets the same layer as {seen[path]}", keys=[key]))
            continue
        seen[path] = key
        weight = module.weight
        expected = (1,) if kind in NORMS else (min(as_matrix(weight).shape),)
        if tuple(value.shape) != expected and not (value.numel() == 1 and expected == (1,)):
            what = "svdiff-pytorch stores one scalar per norm layer" if kind in NORMS else "one per singular value"
            problems.append(ShapeMismatchError(
                f"{key}: expected shape {expected} for {type(module).__name__}{tuple(weight.shape)} "
                f"({what}), found {tuple(value.shape)}", keys=[key]))
            continue
        if not value.is_floating_point():
            problems.append(IncompatibleFileError(f"{key}: expected a float tensor, found {value.dtype}", keys=[key]))
            continue
        out[f"{module_name(prefix, model, path)}.delta"] = value.reshape(expected)
    return out, unmatched, problems


def describe_unmatched(unmatched: list[str]) -> str:
    """The report line for keys that match no layer (textual-inversion tokens get a hint)."""
    hint = ""
    if any(k.startswith("modifier_tokens.") for k in unmatched):
        hint = (" (modifier_tokens.* are textual-inversion token embeddings, not spectral shifts: "
                "add them to the tokenizer and the embedding yourself)")
    return f"{len(unmatched)} keys match no layer of the model: {format_keys(unmatched)}{hint}"


def from_ours(model: nn.Module, tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """svdiff-pytorch tensors (float32, `<module path>.delta`, norms as [1]) from our file tensors
    of one model (names with `prefix`); refuses what upstream cannot express."""
    by_name = {}
    for path, _ in model.named_modules():
        for name in accepted_names(prefix, model, path):
            by_name.setdefault(name, path)
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = value
    wrong = sorted(n for n, g in groups.items() if not set(g) <= {"delta", "base_hash", "gain_delta"})
    if wrong:
        raise ConfigError(f"svdiff-pytorch files hold spectral shifts only; not svdiff: {format_keys(wrong)}")
    direct = sorted(n for n, g in groups.items() if "gain_delta" in g)
    if direct:
        raise ConfigError(
            "svdiff-pytorch has one scalar shift per norm layer; these layers use one_d='direct' "
            f"(a shift per channel), which it cannot read: {format_keys(direct)}")
    missing = sorted(n for n in groups if n not in by_name)
    if missing:
        raise ConfigError(f"no layer of the model is named {format_keys(missing)}")
    if not groups:
        raise ConfigError("there are no svdiff layers to export")
    return {file_path(model, by_name[n]) + SUFFIX: g["delta"].detach().to("cpu", torch.float32).contiguous()
            for n, g in groups.items()}
