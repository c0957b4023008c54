"""convert: between file layouts, without changing what the adapter does.

- kohya/LyCORIS ↔ PEFT (`formats.peft`): module paths resolved forward from a base model;
- prefixes (`lycoris_` ↔ `lora_unet_` …): only the prefix part of each name changes;
- SDXL diffusers ↔ SGM UNet names (`formats.sgm`), forward from the UNet's configuration;
- svdiff-pytorch ↔ ours and SaRA official → ours, through `lycoris_like.interop` (they need the
  base model: SVDiff's SVD and SaRA's mask come from it);
- any algorithm → dense `diff` (`combine(to="diff")`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleFileError, format_keys
from ..formats import peft as peft_format
from ..formats import sgm
from ..formats.naming import KNOWN_PREFIXES, split_prefix
from .adapters import AdapterFile
from .base import FOLDER_COMPONENTS, PathComponent, guess_prefix, open_base
from .combine import combine
from .result import Result, Row

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_]+$")
STALE = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


def _rows(f: AdapterFile, note: str = "") -> list[Row]:
    return [Row(name, f.algo(name).algo, None, None, note) for name in f.modules]


def _carry(metadata: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k not in STALE}


# --------------------------------------------------------------------------- PEFT


def to_peft(source: Any, output: str | os.PathLike, *, base: Any, overwrite: bool = False) -> tuple[list[Path], list[str]]:
    """Write a kohya/LyCORIS file as PEFT adapter folder(s): one per model of the file (several
    models → `output/<component>/`). `base` (model, checkpoint or diffusers folder) gives the module
    paths. Returns the folders written and notes (folded Tucker cores …)."""
    f = AdapterFile.read(source)
    if base is None:
        raise ConfigError("PEFT keys are module paths: give the base model (--base) to resolve the file's names")
    base_obj = open_base(base)
    located, unmatched = base_obj.resolve(f.modules)
    if unmatched:
        raise IncompatibleFileError(f"{len(unmatched)} modules match no layer of {base_obj.source}: {format_keys(unmatched)}", keys=unmatched)
    by_component: dict[Any, dict[str, str]] = {}
    for name, loc in located.items():
        by_component.setdefault(loc.component, {})[name] = loc.path
    adapters = {}
    notes: list[str] = []
    for comp, paths in by_component.items():
        tensors = {k: v for k, v in f.tensors.items() if k.partition(".")[0] in paths}
        out, config, meta, comp_notes = peft_format.to_peft(tensors, f.metadata, paths)
        sub = "" if len(by_component) == 1 else (comp.label if comp.label in FOLDER_COMPONENTS else base_obj.prefix_of(comp, paths))
        adapters[sub] = (out, config, meta)
        notes += comp_notes
    return peft_format.write_peft_folders(output, adapters, overwrite=overwrite), notes


def from_peft(folder: str | os.PathLike, *, base: Any = None, prefix: str | None = None) -> Result:
    """A kohya/LyCORIS file from a PEFT adapter folder (or a folder of them, one per component).
    Names come from the record `to_peft` leaves in the metadata, else forward from `base`'s module
    paths (or the PEFT paths themselves) with `prefix` (default: by component or guessed)."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    if (folder / peft_format.CONFIG_NAME).is_file():
        subs = {"": folder}
    else:
        subs = {p.name: p for p in sorted(folder.iterdir()) if (p / peft_format.CONFIG_NAME).is_file()} if folder.is_dir() else {}
    if not subs:
        raise FileNotFoundError(f"{folder}: no {peft_format.CONFIG_NAME} (a PEFT adapter folder)")
    tensors: dict[str, Tensor] = {}
    metadata: dict[str, str] = {}
    ours: dict[str, Any] = {}
    for sub, path in subs.items():
        peft_tensors, config, meta = peft_format.read_peft(path)
        ours = {"algo": str(config.get("peft_type", "")).lower(), "dim": config.get("r"),
                "alpha": config.get("lora_alpha", config.get("alpha")), "converted_from": "peft"}
        comp_prefix = prefix or FOLDER_COMPONENTS.get(sub)
        name_of = _namer(peft_tensors, comp_prefix, base)
        out, meta_back = peft_format.from_peft(peft_tensors, config, meta, name_of)
        clash = sorted(set(out) & set(tensors))
        if clash:
            raise IncompatibleFileError(f"{path}: names already used by another component: {format_keys(clash)}", keys=clash)
        tensors.update(out)
        metadata.update(meta_back)
    f = AdapterFile(str(folder), tensors, metadata)
    return Result(tensors, _rows(f), ours, _carry(metadata))


def _namer(peft_tensors: Mapping[str, Tensor], prefix: str | None, base: Any):
    """path → file name, forward: from the base's module paths when given, else from the PEFT paths."""
    stems = {k[len(peft_format.PEFT_PREFIX):] if k.startswith(peft_format.PEFT_PREFIX) else k for k in peft_tensors}
    paths = {s.rsplit(".", 2 if s.endswith(".weight") else 1)[0] for s in stems}
    if base is not None:
        base_obj = open_base(base)
        for comp in base_obj.components:
            if paths <= set(comp.paths()):
                chosen = prefix or comp.prefix or comp.fallback_prefix or "lycoris"
                return lambda path, comp=comp, chosen=chosen: comp.name(chosen, path)
        raise IncompatibleFileError(f"the PEFT paths are not module paths of {base_obj.source}")
    comp = PathComponent(paths, prefix, "peft")
    chosen = prefix or guess_prefix(paths)
    return lambda path: comp.name(chosen, path)


# --------------------------------------------------------------------------- names


def rename_prefix(source: Any, mapping: Mapping[str, str]) -> Result:
    """Change the model prefix of module names (`{"lycoris": "lora_unet"}`); suffixes, tensors
    and metadata are kept bit-exactly."""
    for old, new in mapping.items():
        if not (_PREFIX_RE.match(old) and _PREFIX_RE.match(new)):
            raise ConfigError(f"prefixes look like 'lora_unet' or 'lycoris', got {old!r} → {new!r}")
    f = AdapterFile.read(source)
    known = tuple(set(KNOWN_PREFIXES) | set(mapping))
    renamed: dict[str, str] = {}
    for name in f.modules:
        prefix = split_prefix(name, known)
        renamed[name] = mapping[prefix] + name[len(prefix):] if prefix in mapping else name
    if not any(renamed[n] != n for n in renamed):
        found = sorted({split_prefix(n, KNOWN_PREFIXES) or n.split("_")[0] for n in f.modules})
        raise IncompatibleFileError(f"{f.label}: no module name starts with {', '.join(map(repr, mapping))}; its prefixes: {', '.join(found)}")
    return _renamed(f, renamed, "renamed")


def _renamed(f: AdapterFile, renamed: Mapping[str, str], note: str) -> Result:
    targets = list(renamed.values())
    dupes = sorted({n for n in targets if targets.count(n) > 1})
    if dupes:
        raise IncompatibleFileError(f"renaming would merge modules into one name: {format_keys(dupes)}", keys=dupes)
    tensors = {}
    rows = []
    for name, group in f.modules.items():
        new = renamed[name]
        tensors.update({f"{new}.{suffix}": t for suffix, t in group.items()})
        rows.append(Row(new, f.algo(name).algo, None, None, f"{note} from {name}" if new != name else ""))
    return Result(tensors, rows, {}, _carry(f.metadata) or {"ss_network_module": "lycoris.kohya"})


def _unet(unet: Any) -> nn.Module:
    if unet is None:
        return sgm.build_unet()
    if isinstance(unet, nn.Module):
        return unet
    if isinstance(unet, Mapping):
        return sgm.build_unet(unet)
    path = Path(unet)
    if path.is_dir():
        path = path / "config.json" if (path / "config.json").is_file() else path / "unet" / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{unet}: not a UNet config.json ({exc})") from exc
    return sgm.build_unet(config)


def to_sgm(source: Any, *, unet: Any = None, reverse: bool = False) -> Result:
    """SDXL UNet names diffusers → SGM (kohya's SDXL spelling), or back with `reverse=True`.
    `unet` is a diffusers UNet, its config (dict or config.json / model folder); default SDXL base."""
    f = AdapterFile.read(source)
    mapping = sgm.name_map(_unet(unet))
    if reverse:
        mapping = {v: k for k, v in mapping.items()}
    renamed = {}
    unknown = []
    for name in f.modules:
        if split_prefix(name) != "lora_unet":
            renamed[name] = name  # text encoders are spelled the same in both
        elif name in mapping:
            renamed[name] = mapping[name]
        else:
            unknown.append(name)
    if unknown:
        already = "SGM" if not reverse else "diffusers"
        raise IncompatibleFileError(
            f"{len(unknown)} UNet modules are not {('diffusers' if not reverse else 'SGM')} names of this UNet "
            f"(already {already}, or another UNet config?): {format_keys(unknown)}", keys=unknown)
    return _renamed(f, renamed, "renamed")


# --------------------------------------------------------------------------- dense, svdiff, sara


def to_diff(source: Any, *, base: Any = None, dtype: str | torch.dtype | None = None) -> Result:
    """Any algorithm → LyCORIS `full`/`diff` (ΔW and Δb dense), exact; see `combine`."""
    return combine([(source, 1.0)], to="diff", base=base, dtype=dtype)


def _network_result(network: Any, note: str) -> Result:
    tensors = network.file_state_dict()
    f = AdapterFile("network", tensors, {})
    config = dict(network.config)
    config.setdefault("dim", None)
    config.setdefault("alpha", None)
    return Result(tensors, _rows(f, note), config)


def from_svdiff_pytorch(path: str | os.PathLike, model: nn.Module, **options: Any) -> Result:
    """svdiff-pytorch's `spectral_shifts.safetensors` → our svdiff file (with base checksums)."""
    from ..interop import load_svdiff_pytorch

    network = load_svdiff_pytorch(model, path, **options)
    try:
        return _network_result(network, "from svdiff-pytorch")
    finally:
        network.remove()


def to_svdiff_pytorch(source: Any, model: nn.Module, output: str | os.PathLike) -> Path:
    """Our svdiff file → svdiff-pytorch's `spectral_shifts.safetensors` (one model)."""
    from ..interop import save_svdiff_pytorch
    from ..loading import load_network

    network = load_network(model, source)
    try:
        return save_svdiff_pytorch(network, output)
    finally:
        network.remove()


def from_sara_official(path: str | os.PathLike, model: nn.Module, *, threshold: float | None = None) -> Result:
    """SaRA's official `unet.pt` (read with weights_only=True) → our sara file."""
    from ..interop import load_official

    network = load_official(model, path, threshold=threshold)
    try:
        return _network_result(network, "from SaRA official")
    finally:
        network.remove()


def load_pretrained(folder: str | os.PathLike) -> nn.Module:
    """A diffusers or transformers model from a folder with config.json (for conversions that need
    the real base weights)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (give the model's folder, e.g. sd/unet)")
    config = json.loads(config_path.read_text())
    if "_class_name" in config:
        import diffusers

        cls = getattr(diffusers, config["_class_name"], None)
    else:
        import transformers

        cls = next((getattr(transformers, a, None) for a in config.get("architectures") or []), None)
    if cls is None:
        raise ConfigError(f"{config_path}: cannot tell which diffusers/transformers class to build")
    return cls.from_pretrained(str(folder)).eval()
