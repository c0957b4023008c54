"""`load_network`: a LyCORIS/kohya/ours file onto a model, validated completely before anything changes."""

from __future__ import annotations

import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .errors import AdapterError, ConfigError, IncompatibleFileError, format_keys
from .formats.container import check_tensors, read_safetensors
from .formats.metadata import our_config
from .formats.naming import KNOWN_PREFIXES, accepted_names, split_prefix
from .hosts import HostLayer, host_kind
from .modules import detect_algorithm
from .modules.registry import algorithm_classes
from .network import AdapterNetwork, Entry, ModelLike, check_overlap, normalize_models


@dataclass
class LoadReport:
    """What a load used and what it left out (with `strict=False`)."""

    loaded: list[str] = field(default_factory=list)
    unmatched_keys: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.unmatched_keys and not self.rejected

    def summary(self) -> str:
        lines = [f"{len(self.loaded)} modules fit the model"]
        if self.unmatched_keys:
            lines.append(f"{len(self.unmatched_keys)} keys match no layer of the model: {format_keys(self.unmatched_keys)}")
        lines.extend(f"rejected: {reason}" for _, reason in sorted(self.rejected.items()))
        return "\n".join(lines)


def _group(tensors: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """Keys split at the first dot, as every consumer does: module name → {suffix: tensor}."""
    groups: dict[str, dict[str, Tensor]] = defaultdict(dict)
    stray = []
    for key, tensor in tensors.items():
        name, dot, suffix = key.partition(".")
        if not dot or not name or not suffix:
            stray.append(key)
        else:
            groups[name][suffix] = tensor
    return dict(groups), stray


Ambiguous = dict[str, list[str]]


def _index(model: nn.Module, key: str, prefix: str) -> tuple[dict[str, tuple[str, str, nn.Module]], Ambiguous]:
    """Accepted file name → (model key, path, module), and the names several paths share → those paths."""
    index: dict[str, tuple[str, str, nn.Module]] = {}
    ambiguous: Ambiguous = {}
    for path, module in model.named_modules():
        for name in accepted_names(prefix, model, path):
            if name in index and index[name][1] != path:
                paths = ambiguous.setdefault(name, [index[name][1]])
                if path not in paths:
                    paths.append(path)
            index.setdefault(name, (key, path, module))
    return index, ambiguous


def _resolve(
    names: list[str], models: Mapping[str, nn.Module], prefixes: Mapping[str, str], single: bool
) -> tuple[dict[str, tuple[str, str, nn.Module]], Ambiguous]:
    """File module name → host, for the names that match; plus names several layers share."""
    if not single:
        index: dict[str, tuple[str, str, nn.Module]] = {}
        ambiguous: Ambiguous = {}
        for key, model in models.items():
            part, amb = _index(model, key, prefixes[key])
            index.update(part)
            ambiguous.update(amb)
        return {n: index[n] for n in names if n in index}, ambiguous
    # A lone model: use whichever prefix in the file matches it best (files may carry several).
    (key, model), = models.items()
    in_file = {p for n in names if (p := split_prefix(n, KNOWN_PREFIXES + (prefixes[key],))) is not None}
    best: tuple[dict[str, tuple[str, str, nn.Module]], Ambiguous] = ({}, {})
    for prefix in sorted(in_file):
        index, ambiguous = _index(model, key, prefix)
        matched = {n: index[n] for n in names if n in index}
        if len(matched) > len(best[0]):
            best = (matched, ambiguous)
    return best


RUNTIME_OPTIONS = frozenset({"dropout", "rank_dropout", "module_dropout", "rank_dropout_scale", "dtype"})
"""Options a loaded network may be given: they change training (or the parameters' dtype), not
the file's meaning."""


def _load_options(cls: type, config: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The algorithm's `restorable_options` as stored in our metadata, then the caller's options."""
    chosen = {k: config[k] for k in cls.restorable_options if k in config}
    chosen.update({k: v for k, v in options.items() if k in cls.option_names()})
    return chosen


def _build(name: str, path: str, module: nn.Module, group: Mapping[str, Tensor], config: Mapping[str, Any],
           options: Mapping[str, Any]) -> Any:
    if host_kind(module) is None:
        raise IncompatibleFileError(
            f"{name}: targets {path!r}, a {type(module).__name__}, which no algorithm here adapts",
            keys=[f"{name}.{s}" for s in group],
        )
    cls = detect_algorithm(name, group)
    try:
        return cls.from_file_tensors(HostLayer.of(module, path), group, name, **_load_options(cls, config, options))
    except ConfigError as exc:  # e.g. an algorithm that does not adapt this layer type
        raise IncompatibleFileError(f"{name}: {exc}", keys=[f"{name}.{s}" for s in group]) from exc


def _naming_keys(reason: str, keys: list[str]) -> str:
    """`reason`, followed by the offending keys it does not spell out itself."""
    missing = [k for k in keys if k not in reason]
    return f"{reason} [{format_keys(missing)}]" if missing else reason


def _raise(report: LoadReport, errors: dict[str, AdapterError], source: str) -> None:
    kinds = {type(e) for e in errors.values()}
    cls = kinds.pop() if len(kinds) == 1 and not report.unmatched_keys else IncompatibleFileError
    keys = list(report.unmatched_keys) + [k for e in errors.values() for k in getattr(e, "keys", [])]
    raise cls(f"{source} does not fit the model; nothing was changed.\n{report.summary()}", keys=keys)


def network_from_tensors(
    model: ModelLike,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    multiplier: float = 1.0,
    strict: bool = True,
    stack: bool = True,
    source: str = "state dict",
    **options: Any,
) -> AdapterNetwork:
    """Build and attach a network from file tensors; see `load_network`."""
    models, prefixes = normalize_models(model)
    unknown = set(options) - RUNTIME_OPTIONS - {k for c in algorithm_classes() for k in c.restorable_options}
    if unknown:
        raise ConfigError(
            f"cannot set {sorted(unknown)} when loading: the file determines them (loadable options: "
            f"{sorted(RUNTIME_OPTIONS | {k for c in algorithm_classes() for k in c.restorable_options})})"
        )
    stored = our_config(metadata or {})
    check_tensors(tensors, source)
    groups, stray = _group(tensors)
    resolved, ambiguous = _resolve(list(groups), models, prefixes, single=not isinstance(model, Mapping))
    report = LoadReport(unmatched_keys=sorted(stray))
    errors: dict[str, AdapterError] = {}
    entries: list[Entry] = []
    seen: dict[tuple[str, str], str] = {}
    for name, group in groups.items():
        if name not in resolved:
            report.unmatched_keys.extend(f"{name}.{s}" for s in group)
            continue
        key, path, module = resolved[name]
        try:
            if name in ambiguous:
                paths = ", ".join(repr(p) for p in ambiguous[name])
                raise IncompatibleFileError(
                    f"{name}: several layers of the model share this file name ({paths}); "
                    "expected a name that identifies one layer",
                    keys=[name],
                )
            if (key, path) in seen:
                raise IncompatibleFileError(f"{name}: targets the same layer as {seen[key, path]}", keys=[name])
            seen[key, path] = name
            entries.append(Entry(key, path, _build(name, path, module, group, stored, options)))
            report.loaded.append(name)
        except IncompatibleFileError as exc:
            errors[name] = exc
            report.rejected[name] = _naming_keys(str(exc), exc.keys)
    report.unmatched_keys.sort()
    if not entries:
        if errors or report.unmatched_keys:
            _raise(report, errors, source)
        raise IncompatibleFileError(f"{source} holds no adapter tensors")
    if strict and not report.complete:
        _raise(report, errors, source)
    check_overlap(entries, stack)

    config = stored
    if not config:
        settings = Counter((e.adapter.config().get("algo"), e.adapter.config().get("dim"), e.adapter.config().get("alpha")) for e in entries)
        algo, dim, alpha = settings.most_common(1)[0][0]
        config = {"algo": algo, "dim": dim, "alpha": alpha}
    network = AdapterNetwork(models, prefixes, entries, config)
    network.load_report = report
    network.set_multiplier(multiplier)
    network.attach()
    if not report.complete:
        warnings.warn(f"{source}: partial load.\n{report.summary()}", stacklevel=3)
    return network


def load_network(
    model: ModelLike,
    path: str | os.PathLike,
    multiplier: float = 1.0,
    strict: bool = True,
    *,
    stack: bool = True,
    **options: Any,
) -> AdapterNetwork:
    """Load an adapter file onto `model` (a module or `{prefix: module}`) and attach it.

    Prefix and algorithm are detected from the keys, so files from LyCORIS and kohya load without
    our metadata. Every key and shape is checked before the model is touched; with `strict=True`
    any key that does not fit raises a typed error naming it, with `strict=False` the rest loads
    and `network.load_report` lists what was left out. Several networks may stack on one model.
    `options` are training-time settings for the loaded adapters (`dropout`, `rank_dropout`,
    `module_dropout`, `rank_dropout_scale`), `dtype` (the adapter parameters' dtype; default
    float32, float64 on a float64 host), or an algorithm's restorable options (SVDiff's
    `svd_buffers`), which otherwise come from our metadata.
    """
    tensors, metadata = read_safetensors(path)
    return network_from_tensors(
        model, tensors, metadata, multiplier=multiplier, strict=strict, stack=stack, source=str(path), **options
    )
