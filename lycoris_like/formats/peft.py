"""PEFT adapters (`adapter_model.safetensors` + `adapter_config.json`) ↔ kohya/LyCORIS tensors.

PEFT keys are module paths (`base_model.model.<path>.lora_A.weight`), so going to PEFT needs each
file name's module path, which the caller resolves forward from a model or checkpoint
(`tools.base`). Converted: LoRA/LoCon (down ↔ `lora_A`, up ↔ `lora_B`; Tucker cores folded into
`lora_A`; output-axis DoRA ↔ `lora_magnitude_vector`), LoHa (same names; Tucker ↔
`use_effective_conv2d`) and (IA)³ (ours l ↔ PEFT 1 + l). Per-module ranks and alphas go to
`rank_pattern`/`alpha_pattern` keyed by anchored paths; `target_modules` is an exact-path regex.
The kohya names and metadata travel in the safetensors metadata, so kohya → PEFT → kohya is
bit-exact for LoRA/LoCon (without Tucker) and LoHa. LoKr is refused: PEFT derives LoKr factor
layouts from `r` and `decompose_factor` (unsorted factorisation, scrambled Conv1d) and cannot be
given a file's own layout.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import IncompatibleFileError, format_keys
from .container import atomic_folder, read_safetensors, write_safetensors

PEFT_PREFIX = "base_model.model."
RECORD = "lycoris_like.kohya"
"""Metadata key holding the kohya names, metadata and tensor shapes for the way back."""
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

LORA = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "dora_scale": "lora_magnitude_vector"}
LOHA = {k: k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")}
PEFT_TYPES = {"lora": "LORA", "loha": "LOHA", "ia3": "IA3"}


def _group(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        groups.setdefault(name, {})[suffix] = tensor
    return groups


def _algo(name: str, group: Mapping[str, Tensor]) -> str:
    keys = set(group)
    if {"lora_down.weight", "lora_up.weight"} <= keys:
        return "lora"
    if "hada_w1_a" in keys:
        return "loha"
    if "on_input" in keys and "weight" in keys:
        return "ia3"
    if any(k.startswith("lokr_") for k in keys):
        raise IncompatibleFileError(
            f"{name}: LoKr is not converted to PEFT: PEFT derives LoKr factor layouts from r and "
            "decompose_factor and cannot be given this file's layout", keys=[name])
    raise IncompatibleFileError(f"{name}: PEFT has no counterpart for keys {sorted(keys)}", keys=[name])


def _anchored(path: str) -> str:
    """A rank/alpha pattern key PEFT matches against this exact path only."""
    return "^" + re.escape(path)


def _alpha(group: Mapping[str, Tensor], rank: int) -> float:
    return float(group["alpha"].float().reshape(-1)[0]) if "alpha" in group else float(rank)


def _most_common(values: dict[str, Any]) -> Any:
    return Counter(values.values()).most_common(1)[0][0]


def to_peft(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], paths: Mapping[str, str]
            ) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, str], list[str]]:
    """(PEFT tensors, adapter_config, safetensors metadata, notes) for a kohya file of one model.

    `paths` maps every file module name to its module path in that model."""
    groups = _group(tensors)
    missing = sorted(set(groups) - set(paths))
    if missing:
        raise IncompatibleFileError(f"no module path for {format_keys(missing)}", keys=missing)
    algos = {name: _algo(name, g) for name, g in groups.items()}
    kinds = set(algos.values())
    if len(kinds) != 1:
        raise IncompatibleFileError(f"a PEFT adapter holds one algorithm; this file mixes {sorted(kinds)}: split it first")
    algo = kinds.pop()
    out: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    shapes: dict[str, list[int]] = {}
    notes: list[str] = []
    dora = {name: "dora_scale" in g for name, g in groups.items()}
    if algo == "lora" and len(set(dora.values())) > 1:
        raise IncompatibleFileError("PEFT's use_dora is global; this file has DoRA on some modules only")
    config: dict[str, Any] = {"peft_type": PEFT_TYPES[algo], "task_type": None, "inference_mode": True,
                              "base_model_name_or_path": None, "revision": None}
    feedforward = []
    tucker = set()
    for name, group in groups.items():
        path = paths[name]
        stem = PEFT_PREFIX + path + "."
        if algo == "lora":
            down, up, mid = group["lora_down.weight"], group["lora_up.weight"], group.get("lora_mid.weight")
            rank = down.shape[0]
            if mid is not None:  # PEFT has no LoCon Tucker core: fold it into lora_A (exact maths)
                folded = torch.einsum("ij...,jq->iq...", mid.double(), down.double().reshape(rank, down.shape[1]))
                down = folded.to(down.dtype).contiguous()
                notes.append(f"{name}: Tucker core folded into lora_A")
            out[stem + "lora_A.weight"] = down
            out[stem + "lora_B.weight"] = up
            if "dora_scale" in group:
                scale = group["dora_scale"]
                out_axis = scale.numel() == up.shape[0]
                if not out_axis:
                    raise IncompatibleFileError(f"{name}.dora_scale: input-axis DoRA has no PEFT form (PEFT normalises per output)", keys=[f"{name}.dora_scale"])
                peft_shape = (scale.numel(),) if down.dim() == 2 else (1, scale.numel(), *(1,) * (down.dim() - 2))
                out[stem + "lora_magnitude_vector"] = scale.reshape(peft_shape).contiguous()
                shapes[f"{name}.dora_scale"] = list(scale.shape)
        elif algo == "loha":
            if "dora_scale" in group:
                raise IncompatibleFileError(f"{name}: PEFT's LoHa has no DoRA", keys=[f"{name}.dora_scale"])
            rank = group["hada_w1_b"].shape[0]
            for key in LOHA:
                if key in group:
                    out[stem + key] = group[key]
            if "hada_t1" in group:
                tucker.add(name)
        else:  # ia3
            weight = group["weight"]
            on_input = bool(int(group["on_input"].reshape(-1)[0]))
            vec = weight.reshape(-1)
            if weight.dim() == 1:  # Linear: PEFT holds (out, 1) or, on the input side, (1, in)
                peft_shape = (1, vec.numel()) if on_input else (vec.numel(), 1)
            else:
                peft_shape = tuple(weight.shape)
            out[stem + "ia3_l"] = (1.0 + vec.float()).to(weight.dtype).reshape(peft_shape).contiguous()
            shapes[f"{name}.weight"] = list(weight.shape)
            if on_input:
                feedforward.append(path)
            rank = 0
        if algo != "ia3":
            ranks[path] = rank
            alphas[path] = _alpha(group, rank)
    targets = [paths[n] for n in groups]
    config["target_modules"] = "(?:" + "|".join(re.escape(p) for p in targets) + ")"
    if algo == "ia3":
        config["feedforward_modules"] = "(?:" + "|".join(re.escape(p) for p in feedforward) + ")" if feedforward else []
        config["fan_in_fan_out"] = False
    else:
        r, alpha = _most_common(ranks), _most_common(alphas)
        config.update({
            "r": r,
            "rank_pattern": {_anchored(p): v for p, v in ranks.items() if v != r},
            "alpha_pattern": {_anchored(p): v for p, v in alphas.items() if v != alpha},
        })
        if algo == "lora":
            config.update({"lora_alpha": alpha, "use_dora": any(dora.values()), "use_rslora": False, "bias": "none",
                           "lora_dropout": 0.0, "fan_in_fan_out": False, "init_lora_weights": True})
        else:
            if tucker and len(tucker) != len(groups):
                notes.append("use_effective_conv2d is global in PEFT: non-Tucker convs with kernel > 1 will not load")
            config.update({"alpha": alpha, "use_effective_conv2d": bool(tucker), "rank_dropout": 0.0, "module_dropout": 0.0,
                           "init_weights": True})
    record = {"names": {paths[n]: n for n in groups}, "metadata": dict(metadata), "shapes": shapes,
              "no_alpha": [n for n, g in groups.items() if "alpha" not in g and algo != "ia3"]}
    return out, config, {"format": "pt", RECORD: json.dumps(record, sort_keys=True)}, notes


def _pattern_value(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
    """PEFT's own rule (`get_pattern_key`): the first key matching the end of the path."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def from_peft(tensors: Mapping[str, Tensor], config: Mapping[str, Any], metadata: Mapping[str, str],
              name_of: Callable[[str], str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(kohya tensors, metadata) for a PEFT adapter; `name_of(path)` names modules that the
    metadata record (written by `to_peft`) does not."""
    peft_type = str(config.get("peft_type", "")).upper()
    suffixes = {"LORA": {v: k for k, v in LORA.items()}, "LOHA": LOHA, "IA3": {"ia3_l": "weight"}}.get(peft_type)
    if suffixes is None:
        raise IncompatibleFileError(f"PEFT adapter type {peft_type or '(none)'!r} is not converted; LORA, LOHA and IA3 are")
    record: dict[str, Any] = {}
    if RECORD in metadata:
        try:
            record = json.loads(metadata[RECORD])
        except ValueError:
            record = {}
    names: dict[str, str] = record.get("names", {})
    shapes: dict[str, list[int]] = record.get("shapes", {})
    no_alpha = set(record.get("no_alpha", []))
    by_path: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        stem = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for peft_suffix, ours in suffixes.items():
            if stem.endswith("." + peft_suffix):
                by_path.setdefault(stem[: -len(peft_suffix) - 1], {})[ours] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise IncompatibleFileError(f"PEFT keys this converter does not know: {format_keys(unknown)}", keys=unknown)
    if not by_path:
        raise IncompatibleFileError("the PEFT adapter holds no tensors")
    rslora = bool(config.get("use_rslora"))
    default_alpha = config.get("lora_alpha", config.get("alpha"))
    feedforward = config.get("feedforward_modules") or []
    out: dict[str, Tensor] = {}
    for path, group in by_path.items():
        name = names.get(path) or name_of(path)
        if peft_type == "IA3":
            peft_l = group["weight"]
            if isinstance(feedforward, str):
                on_input = re.fullmatch(feedforward, path) is not None
            else:
                on_input = path in feedforward or any(path.endswith("." + f) for f in feedforward)
            vec = (peft_l.float() - 1.0).to(peft_l.dtype).reshape(-1)
            shape = shapes.get(f"{name}.weight") or ([vec.numel()] if peft_l.dim() == 2 else list(peft_l.shape))
            out[f"{name}.weight"] = vec.reshape(shape).contiguous()
            out[f"{name}.on_input"] = torch.tensor(int(on_input), dtype=torch.int64)
            continue
        for ours, tensor in group.items():
            if ours == "dora_scale":
                up = group["lora_up.weight"]
                shape = shapes.get(f"{name}.dora_scale") or [up.shape[0], *(1,) * (up.dim() - 1)]
                tensor = tensor.reshape(shape).contiguous()
            out[f"{name}.{ours}"] = tensor
        rank = (group.get("lora_down.weight") if peft_type == "LORA" else group["hada_w1_b"]).shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, path, default_alpha if default_alpha is not None else rank))
        if rslora:  # readers compute alpha / r; PEFT's rs-LoRA scale is alpha / √r
            alpha = alpha * rank ** 0.5
        if name not in no_alpha:
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    meta = dict(record.get("metadata", {}))
    return out, meta


def read_peft(folder: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, str]]:
    """(tensors, adapter_config, safetensors metadata) of a PEFT adapter folder."""
    folder = Path(folder)
    if folder.is_file() and folder.name == CONFIG_NAME:
        folder = folder.parent
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{folder}: a PEFT adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise IncompatibleFileError(f"{config_path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise IncompatibleFileError(f"{config_path}: expected a JSON object")
    tensors, metadata = read_safetensors(weights_path)
    return tensors, config, metadata


def write_peft_folders(output: str | os.PathLike, adapters: Mapping[str, tuple[dict[str, Tensor], dict[str, Any], dict[str, str]]],
                       overwrite: bool = False) -> list[Path]:
    """Write PEFT adapter folders atomically: `{"": adapter}` → `output/`, several →
    `output/<sub>/` each. The whole tree is built beside `output` and renamed into place."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    written = []
    with atomic_folder(output) as tmp:
        for sub, (tensors, config, metadata) in adapters.items():
            folder = tmp / sub if sub else tmp
            folder.mkdir(parents=True, exist_ok=True)
            write_safetensors(folder / WEIGHTS_NAME, tensors, metadata)
            (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            written.append(output / sub if sub else output)
    return written
