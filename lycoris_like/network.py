"""AdapterNetwork — the adapters of one model (or a whole pipeline) — and `create_network`."""

from __future__ import annotations

import difflib
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._version import __version__
from .errors import ConfigError, MergeError, OverlapError, format_keys
from .formats.container import data_hash, write_safetensors
from .formats.metadata import build_metadata
from .formats.naming import default_prefix, module_name
from .injection import MergeRecord, attach, attached_adapters, detach, dispatch_of, merges_of, require_pristine
from .modules import AdapterModule
from .modules.compose import adapted_parameters
from .modules.files import check_dim
from .modules.registry import class_for, resolve
from .plan import FORWARD_MODES
from .presets import load_preset, resolve_overrides, select, candidates

ModelLike = nn.Module | Mapping[str, nn.Module]
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_]+$")


class Entry(NamedTuple):
    """One adapted layer: which model (key, "" for a lone model), its path there, its adapter."""

    key: str
    path: str
    adapter: AdapterModule

    @property
    def full_path(self) -> str:
        return f"{self.key}.{self.path}" if self.key else self.path


class _Backup(NamedTuple):
    target: Tensor
    original: Tensor


class _Merged(NamedTuple):
    """One merged layer: the tensors written, their originals, and the host's merge record."""

    adapter: AdapterModule
    backups: list[_Backup]
    record: MergeRecord


def normalize_models(model: ModelLike) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """`({key: model}, {key: file prefix})`; a lone model gets key "" and its default prefix."""
    if isinstance(model, nn.Module):
        return {"": model}, {"": default_prefix(model)}
    if isinstance(model, Mapping) and model:
        for key, value in model.items():
            if not isinstance(key, str) or not _PREFIX_RE.match(key):
                raise ConfigError(f"model keys are file prefixes like 'lora_unet' or 'lora_te1', got {key!r}")
            if not isinstance(value, nn.Module):
                raise ConfigError(f"model {key!r} is a {type(value).__name__}, not a torch.nn.Module")
        return dict(model), {key: key for key in model}
    raise ConfigError(f"expected a torch.nn.Module or a non-empty dict of them, got {type(model).__name__}")


class AdapterNetwork(nn.Module):
    """Adapters attached to host layers. Its parameters are the adapters' only; the host models
    are referenced, never registered, so `state_dict()` holds the training state alone."""

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        prefixes: Mapping[str, str],
        entries: Iterable[Entry],
        config: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self._models = dict(models)
        self._prefixes = dict(prefixes)
        self._entries: list[Entry] = []
        self.config: dict[str, Any] = dict(config)
        self.load_report: Any = None
        self._merged: list[_Merged] | None = None
        self._folded = False
        self._multiplier = 1.0
        for entry in entries:
            name = module_name(self._prefixes[entry.key], self._models[entry.key], entry.path)
            if name in self._modules:
                other = next(e for e in self._entries if self._name(e) == name)
                raise ConfigError(
                    f"layers {other.full_path!r} and {entry.full_path!r} share the file name {name!r}; "
                    "exclude one of them"
                )
            if hasattr(type(self), name):
                raise ConfigError(f"file name {name!r} clashes with an AdapterNetwork attribute")
            self.add_module(name, entry.adapter)
            self._entries.append(entry)

    def _name(self, entry: Entry, prefix: str | None = None) -> str:
        return module_name(prefix or self._prefixes[entry.key], self._models[entry.key], entry.path)

    # ------------------------------------------------------------------ views

    @property
    def adapters(self) -> dict[str, AdapterModule]:
        """Host module path (as in `named_modules()`, `key.path` for pipelines) → adapter."""
        return {e.full_path: e.adapter for e in self._entries}

    @property
    def models(self) -> dict[str, nn.Module]:
        return dict(self._models)

    @property
    def prefixes(self) -> dict[str, str]:
        """Model key → the file prefix its module names start with."""
        return dict(self._prefixes)

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @property
    def merged(self) -> bool:
        return self._merged is not None

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[AdapterModule]:
        return iter(e.adapter for e in self._entries)

    def extra_repr(self) -> str:
        algos = Counter(e.adapter.algo for e in self._entries)
        return f"{len(self._entries)} adapters ({', '.join(f'{n}×{a}' for a, n in algos.items())})"

    # ------------------------------------------------------------------ runtime switches

    def set_multiplier(self, multiplier: float) -> None:
        """The runtime strength m in W + m·ΔW (changes no compiled graph: it is a tensor)."""
        m = float(multiplier)
        if not math.isfinite(m):
            raise ConfigError(f"multiplier must be finite, got {multiplier!r}")
        for adapter in self:
            adapter.multiplier.fill_(m)
            adapter.multiplier_value = m
            adapter.settings_changed()
        self._multiplier = m

    def enable(self) -> None:
        self._set_all("enabled", True)

    def disable(self) -> None:
        self._set_all("enabled", False)

    def set_forward_mode(self, mode: str) -> None:
        """`auto` (cost model per layer and call), `rebuild` (one op on W + m·ΔW) or `bypass`."""
        if mode not in FORWARD_MODES:
            raise ConfigError(f"forward_mode must be one of {FORWARD_MODES}, got {mode!r}")
        self._set_all("forward_mode", mode)

    def set_dropout(self, dropout: float | None = None, rank_dropout: float | None = None,
                    module_dropout: float | None = None) -> None:
        """Change the training-time dropout probabilities of every adapter (None: keep)."""
        changes = {k: v for k, v in (("dropout", dropout), ("rank_dropout", rank_dropout),
                                     ("module_dropout", module_dropout)) if v is not None}
        for name, p in changes.items():
            try:
                value = float(p)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be a number in [0, 1), got {p!r}") from None
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {p!r}")
            self._set_all(name, value)

    def _set_all(self, name: str, value: Any) -> None:
        """Set an adapter setting on every adapter and replan their layers' forwards."""
        for adapter in self:
            setattr(adapter, name, value)
            adapter.settings_changed()

    def attach(self) -> None:
        """Inject the adapters into their host layers (`create_network` and `load_network` do this)."""
        self._require_unfolded("attach()")
        for adapter in self:
            attach(adapter)

    def remove(self) -> None:
        """Detach every adapter (unmerging first): the hosts are exactly as before."""
        if self._folded:
            return
        if self.merged:
            self.unmerge()
        for adapter in self:
            detach(adapter)

    def param_groups(self, lr: float | None = None) -> list[dict[str, Any]]:
        """Optimizer parameter groups with each algorithm's default learning rates (see
        `lycoris_like.training.param_groups`): `torch.optim.AdamW(net.param_groups(), lr=1e-4)`."""
        from .training import param_groups

        return param_groups(self, lr)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the adapted model, so the network itself can be wrapped (e.g. in DDP)."""
        if len(self._models) != 1:
            raise ConfigError("forward() runs a single model; call the models of a pipeline directly")
        return next(iter(self._models.values()))(*args, **kwargs)

    # ------------------------------------------------------------------ merge / unmerge / bake

    def _merged_weight(
        self, adapter: AdapterModule, multiplier: float, inplace: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        weight, bias = adapted_parameters(adapter.host, [adapter], [multiplier], inplace=inplace)
        if bias is not None and not adapter.changes_bias:
            bias = None  # only write (and back up) what the adapter changes
        return weight.detach(), None if bias is None else bias.detach()

    @staticmethod
    def _merge_multiplier(adapter: AdapterModule, multiplier: float | None) -> float:
        """The multiplier a merge applies: the adapter's own, or the one given."""
        if multiplier is None:
            return adapter.multiplier_value
        try:
            m = float(multiplier)
        except (TypeError, ValueError):
            raise ConfigError(f"multiplier must be a number, got {multiplier!r}") from None
        if not math.isfinite(m):
            raise ConfigError(f"multiplier must be finite, got {multiplier!r}")
        return m

    @staticmethod
    def _require_pristine(adapter: AdapterModule, what: str) -> None:
        """An adapter that reads its ΔW from the host weight needs a host nobody merged into."""
        require_pristine(adapter, merges_of(adapter.host.module), what)

    @staticmethod
    def _any_non_finite(news: Iterable[Tensor | None], olds: Iterable[Tensor | None]) -> bool:
        """Whether a merged tensor holds NaN/Inf where its original did not. The all-finite case
        is one read of each (min and max propagate NaN), with no full-size temporary."""
        for new, old in zip(news, olds):
            if new is None or not new.numel():
                continue
            low, high = torch.aminmax(new)
            if not bool(torch.isfinite(low) & torch.isfinite(high)):
                if bool((~torch.isfinite(new) & torch.isfinite(old)).any()):
                    return True
        return False

    def _require_unfolded(self, what: str) -> None:
        if self._folded:
            raise MergeError(f"{what}: this network was folded into the model's weights; load it again onto a fresh model")

    def _require_local(self, what: str) -> None:
        """Sharded (FSDP) parameters must be gathered before whole-tensor work."""
        if any(type(p).__name__ == "DTensor" for p in self.parameters()):
            raise ConfigError(f"{what} needs the full parameters, but this network is sharded (FSDP): call unshard() first")

    @torch.no_grad()
    def merge(self, multiplier: float | None = None) -> None:
        """Fold every adapter into its host weights (fp32 compute, one cast), keeping the originals
        so `unmerge()` is bit-exact. Each layer is backed up, then written in place (the only
        full-size allocations are the backup and ΔW). A layer whose merge creates NaN/Inf is put
        back and stops the writing; the remaining layers are still checked, every layer written is
        restored, and `MergeError` names all the bad ones: on failure no weight has changed."""
        self._require_local("merge()")
        self._require_unfolded("merge()")
        if self.merged:
            raise MergeError("this network is already merged; unmerge() first")
        multipliers = [self._merge_multiplier(a, multiplier) for a in self]
        for adapter in self:
            self._require_pristine(adapter, "merge()")
        done: list[_Merged] = []
        bad: list[str] = []
        try:
            for entry, m in zip(self._entries, multipliers):
                adapter, host = entry.adapter, entry.adapter.host
                if bad:  # a layer failed: check the rest, write nothing
                    weight, bias = self._merged_weight(adapter, m)
                    if self._any_non_finite((weight, bias), (host.weight, host.bias)):
                        bad.append(entry.full_path)
                    continue
                merged = self._merge_in_place(adapter, m)
                if self._any_non_finite([b.target for b in merged.backups], [b.original for b in merged.backups]):
                    bad.append(entry.full_path)
                    self._restore([merged])
                else:
                    done.append(merged)
            if bad:
                raise MergeError(f"merging would create NaN/Inf in {format_keys(bad)}; no weight was changed")
        except BaseException:
            self._restore(done)
            raise
        self._merged = done
        self._set_all("merged", True)

    def _merge_in_place(self, adapter: AdapterModule, multiplier: float) -> _Merged:
        """Back up the tensors `adapter` changes, write the merged values into them and push a
        merge record on the host (`_restore` undoes it all)."""
        host = adapter.host
        targets = [host.weight] + ([host.bias] if host.bias is not None and adapter.changes_bias else [])
        backups = [_Backup(t, t.detach().clone()) for t in targets]
        try:
            weight, bias = self._merged_weight(adapter, multiplier, inplace=True)
            for backup, new in zip(backups, (weight, bias)):
                if new.data_ptr() != backup.target.data_ptr():  # not written in place (a cast, SaRA)
                    backup.target.copy_(new)
        except BaseException:
            for backup in backups:
                backup.target.copy_(backup.original)
            raise
        record = MergeRecord(id(self), [(b.target, b.target._version) for b in backups])
        dispatch_of(host.module).merges.append(record)
        return _Merged(adapter, backups, record)

    @staticmethod
    def _restore(merged: list[_Merged]) -> None:
        """Write the originals back newest first and pop the merge records; the weights are then
        again exactly what the merge below (if any) wrote, so its record is refreshed."""
        for layer in reversed(merged):
            for backup in layer.backups:
                backup.target.copy_(backup.original)
            records = merges_of(layer.adapter.host.module)
            if layer.record in records:
                records.remove(layer.record)
            if records:
                records[-1].refresh()

    @torch.no_grad()
    def fold(self, multiplier: float | None = None) -> None:
        """Merge for good and detach the adapters (peft's `merge_and_unload`): W ← W + m·ΔW is
        written in place with no backups, so it needs no memory beyond one layer's temporaries —
        `merge()` keeps a copy of every adapted weight for its exact `unmerge()`. All or nothing:
        every layer is checked for NaN/Inf before the first write (`MergeError`, nothing changed).
        A merged network is unmerged first. Afterwards the model is a plain model; the network
        can still be saved, but not attached, merged or baked again."""
        self._require_local("fold()")
        self._require_unfolded("fold()")
        multipliers = [self._merge_multiplier(e.adapter, multiplier) for e in self._entries]
        if self.merged:
            self.unmerge()
        for adapter in self:
            self._require_pristine(adapter, "fold()")
        bad = []
        for entry, m in zip(self._entries, multipliers):
            host = entry.adapter.host
            if self._any_non_finite(self._merged_weight(entry.adapter, m), (host.weight, host.bias)):
                bad.append(entry.full_path)
        if bad:
            raise MergeError(f"folding would create NaN/Inf in {format_keys(bad)}; no weight was changed")
        for entry, m in zip(self._entries, multipliers):
            host = entry.adapter.host
            for target, new in zip((host.weight, host.bias), self._merged_weight(entry.adapter, m, inplace=True)):
                if new is not None and new.data_ptr() != target.data_ptr():
                    target.copy_(new)
            detach(entry.adapter)
        self._folded = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact pre-merge weights. Refuses if they changed since (a later merge of
        another network that is still merged, or an optimizer step) — unmerge in reverse order."""
        if self._merged is None:
            raise MergeError("this network is not merged")
        changed = [m.record for m in self._merged
                   if merges_of(m.adapter.host.module)[-1:] != [m.record] or not m.record.intact()]
        if changed:
            raise MergeError(
                f"{len(changed)} merged weights changed after this merge (another network merged later, "
                "or the weights were trained); unmerge networks in reverse order of merging"
            )
        self._restore(self._merged)
        self._merged = None
        self._set_all("merged", False)

    @torch.no_grad()
    def bake(self, key: str | None = None) -> dict[str, Tensor]:
        """The state dict of a model with this network merged in, leaving the model unchanged."""
        self._require_local("bake()")
        self._require_unfolded("bake()")
        if key is None:
            if len(self._models) != 1:
                raise ConfigError(f"name the model to bake, one of {sorted(self._models)}")
            key = next(iter(self._models))
        if key not in self._models:
            raise ConfigError(f"no model {key!r} in this network; it has {sorted(self._models)}")
        state = {k: v.detach() for k, v in self._models[key].state_dict().items()}
        if self.merged:
            return {k: v.clone() for k, v in state.items()}
        for entry in self._entries:
            if entry.key != key:
                continue
            self._require_pristine(entry.adapter, "bake()")
            weight, bias = self._merged_weight(entry.adapter, entry.adapter.multiplier_value)
            stem = f"{entry.path}." if entry.path else ""
            state[stem + "weight"] = weight
            if bias is not None:
                state[stem + "bias"] = bias
        return state

    # ------------------------------------------------------------------ files

    def file_state_dict(self, *, prefix: str | None = None, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The tensors of a saved file: LyCORIS/kohya names, float32 `alpha`, optional cast."""
        if prefix is not None:
            if len(self._models) != 1:
                raise ConfigError("prefix= renames a single-model network; a pipeline keeps its model keys")
            if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
                raise ConfigError(f"prefix must look like 'lora_unet', got {prefix!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self._require_local("saving")
        out = {}
        for entry in self._entries:
            name = self._name(entry, prefix)
            for suffix, tensor in entry.adapter.file_tensors().items():
                tensor = tensor.detach().to("cpu")
                if dtype is not None and tensor.is_floating_point() and tensor.dim() > 0:
                    tensor = tensor.to(dtype)  # scalars (alpha, thresholds) stay as written
                out[f"{name}.{suffix}"] = tensor.contiguous()
        return out

    def save(
        self,
        path: str | os.PathLike,
        *,
        prefix: str | None = None,
        dtype: torch.dtype | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Path:
        """Write a `.safetensors` file atomically, readable by LyCORIS, kohya, ComfyUI and A1111."""
        path = Path(path)
        tensors = self.file_state_dict(prefix=prefix, dtype=dtype)
        meta = build_metadata(
            models=self._models,
            config=self.config,
            output_name=path.stem,
            model_hash=data_hash(tensors),
            version=__version__,
            extra=metadata,
        )
        write_safetensors(path, tensors, meta)
        return path


# ---------------------------------------------------------------------------- create_network


def _check_options(algo: str, options: Mapping[str, Any], where: str) -> None:
    allowed = resolve(algo)[0].option_names()
    unknown = set(options) - allowed
    if unknown:
        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, allowed, 1)) else repr(u) for u in sorted(unknown)]
        raise ConfigError(f"{where}: unknown options for {algo}: {', '.join(hints)}; accepted: {sorted(allowed)}")


def _check_alpha(alpha: Any, what: str) -> float | None:
    if alpha is None:
        return None
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {alpha!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what} must be finite and ≥ 0 (0 or None means alpha = rank), got {alpha!r}")
    return value


def check_overlap(entries: list[Entry], stack: bool) -> None:
    if stack:
        return
    taken = [e.full_path for e in entries if attached_adapters(e.adapter.host.module)]
    if taken:
        raise OverlapError(
            f"{len(taken)} layers already carry an adapter from another network ({format_keys(taken, 4)}); "
            "pass stack=True to stack networks"
        )


def create_network(
    model: ModelLike,
    algo: str = "lora",
    dim: int = 4,
    alpha: float | None = 1.0,
    *,
    preset: str | os.PathLike | Mapping[str, Any] | None = "full",
    conv_dim: int | None = None,
    conv_alpha: float | None = None,
    multiplier: float = 1.0,
    targets: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    stack: bool = False,
    forward_mode: str = "auto",
    **algo_options: Any,
) -> AdapterNetwork:
    """Build adapters on the layers a preset selects and attach them at once.

    `model` is a module or `{prefix: module}` for a pipeline (`{"lora_unet": unet, "lora_te1": te1}`).
    Convs with kernel > 1 use `conv_dim`/`conv_alpha` (default: `dim`/`alpha`). `targets` narrows the
    preset, `exclude` removes layers, `overrides` maps patterns to `{algo, dim, alpha, options…}`.
    Every bad argument raises `ConfigError` before the model is touched.
    """
    models, prefixes = normalize_models(model)
    cls, implied = resolve(algo)
    algo_options = {**implied, **algo_options}
    _check_options(algo, algo_options, "create_network")
    dim = check_dim(dim)
    conv_dim = dim if conv_dim is None else check_dim(conv_dim, "conv_dim")
    alpha = _check_alpha(alpha, "alpha")
    conv_alpha = alpha if conv_alpha is None else _check_alpha(conv_alpha, "conv_alpha")
    if forward_mode not in FORWARD_MODES:
        raise ConfigError(f"forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
    if not math.isfinite(float(multiplier)):
        raise ConfigError(f"multiplier must be finite, got {multiplier!r}")
    resolved = load_preset(preset)
    chosen = select(candidates(models, cls.kinds_for(algo_options)), resolved, targets, exclude)
    per_layer = resolve_overrides(chosen, {**resolved.overrides, **(overrides or {})}, resolved.class_overrides)

    entries = []
    for cand in chosen:
        wide_conv = cand.host.kernel_numel > 1
        settings = {
            "algo": algo,
            "dim": conv_dim if wide_conv else dim,
            "alpha": conv_alpha if wide_conv else alpha,
            **algo_options,
        }
        override = dict(per_layer.get(cand.full_path, {}))
        if "algo" in override and override["algo"] != algo:
            settings = {k: v for k, v in settings.items() if k in ("dim", "alpha", "dtype")}
            settings.update(resolve(override["algo"])[1])
        settings.update(override)
        layer_algo = settings.pop("algo")
        layer_dim = check_dim(settings.pop("dim"), f"dim for {cand.full_path}")
        layer_alpha = _check_alpha(settings.pop("alpha"), f"alpha for {cand.full_path}")
        _check_options(layer_algo, settings, f"override for {cand.full_path}")
        layer_cls = class_for(resolve(layer_algo)[0], settings)
        adapter = layer_cls(cand.host, layer_dim, layer_alpha, **settings)
        entries.append(Entry(cand.key, cand.path, adapter))
    check_overlap(entries, stack)

    config = {
        "algo": cls.algo,
        "dim": dim,
        "alpha": alpha if alpha else dim,
        "conv_dim": conv_dim,
        "conv_alpha": conv_alpha if conv_alpha else conv_dim,
        "preset": resolved.name,
        **{k: v for k, v in algo_options.items() if k != "dtype"},
    }
    if overrides:
        config["overrides"] = {k: dict(v) for k, v in overrides.items()}
    network = AdapterNetwork(models, prefixes, entries, config)
    network.set_multiplier(multiplier)
    network.set_forward_mode(forward_mode)
    network.attach()
    return network
