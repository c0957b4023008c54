"""bake: a base checkpoint + adapter files with multipliers → a new checkpoint with them merged.

Each targeted layer is read alone, merged with `modules.compose.adapted_parameters` — the very
function `AdapterNetwork.merge()` and the rebuild forward use, so the baked weights are bit-for-bit
what `merge()` gives: W + Σ mᵢ·ΔWᵢ in fp32 (fp64 for fp64 weights), cast once to the base's dtype —
and released. Untouched tensors are copied as they are. Peak memory is about one copy of the
model (the output being assembled) plus one layer. The output is written atomically; for a
diffusers folder the whole new folder appears at once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._version import __version__
from ..errors import ConfigError, IncompatibleFileError, MergeError, format_keys
from ..formats.container import atomic_folder, write_safetensors
from ..modules.compose import adapted_parameters
from .adapters import AdapterFile, build, stand_in
from .base import Base, CheckpointComponent, Location, open_base
from .progress import track


@dataclass
class BakeReport:
    output: Path
    merged: list[tuple[str, str, str, float]] = field(default_factory=list)
    """(file module name, layer path, algorithm, multiplier) per merged adapter."""
    unmatched: list[str] = field(default_factory=list)
    files_written: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        layers = len({(n, p) for n, p, _, _ in self.merged})
        lines = [f"merged {len(self.merged)} adapter modules into {layers} layers → {self.output}"]
        if self.unmatched:
            lines.append(f"{len(self.unmatched)} modules matched no layer and were left out: {format_keys(self.unmatched)}")
        return "\n".join(lines)


def _pairs(adapters: Sequence[Any]) -> list[tuple[AdapterFile, float]]:
    out = []
    for item in adapters:
        source, m = item if isinstance(item, tuple) else (item, 1.0)
        try:
            m = float(m)
        except (TypeError, ValueError):
            raise ConfigError(f"multiplier of {source} must be a number, got {m!r}") from None
        if not math.isfinite(m):
            raise ConfigError(f"multiplier of {source} must be finite, got {m!r}")
        out.append((AdapterFile.read(source), m))
    if not out:
        raise ConfigError("bake needs at least one adapter file")
    return out


def _plan(base: Base, files: list[tuple[AdapterFile, float]], strict: bool) -> tuple[dict[Location, list[tuple[str, AdapterFile, float]]], list[str]]:
    """Which adapters go on which layer, validated against the layer shapes before any work."""
    plan: dict[Location, list[tuple[str, AdapterFile, float]]] = {}
    unmatched_all: list[str] = []
    for f, m in files:
        located, unmatched = base.resolve(f.modules)
        if unmatched and strict:
            raise IncompatibleFileError(
                f"{f.label}: {len(unmatched)} modules match no layer of {base.source}; nothing was written: "
                f"{format_keys(unmatched)}", keys=unmatched)
        if not located:
            raise IncompatibleFileError(f"{f.label}: no module matches a layer of {base.source}")
        unmatched_all += unmatched
        for name, loc in located.items():
            if f.weight_free(name):  # cheap shape check now, on a stand-in of the layer's shape
                build(f.algo(name), stand_in(loc.component.weight_shape(loc.path), loc.path), f.modules[name], name)
            plan.setdefault(loc, []).append((name, f, m))
    return plan, unmatched_all


def merged_layer(comp: CheckpointComponent, path: str, adapters: list[tuple[str, AdapterFile, float]]) -> tuple[Tensor, Tensor | None]:
    """The layer's weight and bias with the adapters merged, in the base's dtypes."""
    host = comp.host(path)
    modules = [build(f.algo(name), host, f.modules[name], name) for name, f, _ in adapters]
    with torch.no_grad():
        weight, bias = adapted_parameters(host, modules, [m for _, _, m in adapters])
    for new, old in ((weight, host.weight), (bias, host.bias)):
        if new is not None and bool((~torch.isfinite(new) & torch.isfinite(old)).any()):
            raise MergeError(f"{comp.label}: merging into {path} would create NaN/Inf; nothing was written")
    return weight, bias


def _bake_store(comp_by_key: dict[tuple[int, str], tuple[CheckpointComponent, str]], plan: dict[Location, list],
                file: Path, store: Any, progress: bool | None) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    pending: dict[tuple[int, str], tuple[Tensor, Tensor | None]] = {}
    for key in track(store.keys_of(file), desc=f"bake {file.name}", enabled=progress):
        target = comp_by_key.get((id(store), key))
        if target is None:
            out[key] = store.read(key)
            continue
        comp, path = target
        slot = (id(comp), path)
        if slot not in pending:
            pending[slot] = merged_layer(comp, path, plan[Location(comp, path)])
        weight_key, bias_key = comp.keys(path)
        weight, bias = pending[slot]
        out[key] = weight if key == weight_key else bias
    return out


def bake(
    base: str | os.PathLike,
    adapters: Sequence[Any],
    output: str | os.PathLike,
    *,
    strict: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
) -> BakeReport:
    """Merge adapter files (`[(path, multiplier), …]`) into a base checkpoint — a safetensors file
    (UNet, text encoder or an original-layout SD/SDXL checkpoint), a folder of shards, or a
    diffusers pipeline folder — and write the result to `output` (same layout, same dtypes)."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    files = _pairs(adapters)
    base_obj = open_base(base)
    if not base_obj.stores:
        raise ConfigError("bake reads a checkpoint on disk; for an in-memory model use AdapterNetwork.bake()")
    plan, unmatched = _plan(base_obj, files, strict)
    comp_by_key: dict[tuple[int, str], tuple[CheckpointComponent, str]] = {}
    for loc in plan:
        comp = loc.component
        assert isinstance(comp, CheckpointComponent)
        weight_key, bias_key = comp.keys(loc.path)
        for key in (weight_key, bias_key):
            if key is not None:
                comp_by_key[id(comp.store), key] = (comp, loc.path)
    report = BakeReport(output, [(n, loc.path, f.algo(n).algo, m) for loc, items in plan.items() for n, f, m in items], unmatched)
    baked_note = json.dumps({"adapters": [[f.label, m] for f, m in files], "version": __version__})

    touched = {comp.store.key_file[key] for (_, key), (comp, _) in comp_by_key.items()}
    if base_obj.folder is None:  # a single file
        (store,) = base_obj.stores
        (file,) = store.files
        tensors = _bake_store(comp_by_key, plan, file, store, progress)
        write_safetensors(output, tensors, {**store.metadata[file], "lycoris_like.baked": baked_note})
        report.files_written.append(output)
        return report

    # A folder: build the new one beside the target, then move it into place in one rename.
    root = Path(base_obj.folder)
    if output.resolve() == root.resolve() or root.resolve() in output.resolve().parents:
        raise ConfigError("the output folder must not be the base folder or inside it")
    with atomic_folder(output) as tmp:
        rel_touched = {p.resolve().relative_to(root.resolve()) for p in touched}
        shutil.copytree(root, tmp, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if (Path(d) / n).resolve().relative_to(root.resolve()) in rel_touched])
        for store in base_obj.stores:
            for file in store.files:
                if file not in touched:
                    continue
                tensors = _bake_store(comp_by_key, plan, file, store, progress)
                target = tmp / file.resolve().relative_to(root.resolve())
                write_safetensors(target, tensors, {**store.metadata[file], "lycoris_like.baked": baked_note})
                del tensors
                report.files_written.append(output / target.relative_to(tmp))
    return report
