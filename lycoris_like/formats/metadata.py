"""Metadata the UIs read (`ss_*`, `modelspec.*`) plus our own keys that make files self-describing."""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import ConfigError

OUR_PREFIX = "lycoris_like."
FORMAT_VERSION = "1"


def base_model_version(models: Mapping[str, nn.Module]) -> tuple[str, str, str] | None:
    """(`ss_base_model_version`, modelspec architecture, resolution) detected from the models."""
    for model in models.values():
        name = type(model).__name__
        config = getattr(model, "config", None)
        config = dict(config) if isinstance(config, Mapping) else {}
        if name == "UNet2DConditionModel":
            if config.get("addition_embed_type") == "text_time":
                return "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", "1024x1024"
            if config.get("cross_attention_dim") == 1024:
                big = config.get("sample_size") == 96
                return ("sd_v2_768_v" if big else "sd_v2"), ("stable-diffusion-v2-768-v" if big else "stable-diffusion-v2-512"), ("768x768" if big else "512x512")
            return "sd_v1", "stable-diffusion-v1", "512x512"
        if name == "SD3Transformer2DModel":
            return "sd3", "stable-diffusion-3", "1024x1024"
        if name == "FluxTransformer2DModel":
            return "flux1", "flux-1-dev", "1024x1024"
    names = {type(m).__name__ for m in models.values()}
    if names == {"CLIPTextModel", "CLIPTextModelWithProjection"}:
        return "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", "1024x1024"
    for model in models.values():
        if type(model).__name__ == "CLIPTextModel":
            hidden = getattr(getattr(model, "config", None), "hidden_size", 768)
            return ("sd_v2", "stable-diffusion-v2-512", "512x512") if hidden == 1024 else ("sd_v1", "stable-diffusion-v1", "512x512")
    return None


def build_metadata(
    *,
    models: Mapping[str, nn.Module],
    config: Mapping[str, Any],
    output_name: str,
    model_hash: str,
    version: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """All metadata for a saved network; `extra` (strings only) overrides what we compute."""
    args = {k: str(v) for k, v in config.items() if k not in ("dim", "alpha") and v is not None}
    meta = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(config.get("dim")),
        "ss_network_alpha": str(config.get("alpha")),
        "ss_network_args": json.dumps(args, sort_keys=True),
        "ss_output_name": output_name,
        "sshs_model_hash": model_hash,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        OUR_PREFIX + "format": FORMAT_VERSION,
        OUR_PREFIX + "version": version,
        OUR_PREFIX + "config": json.dumps(dict(config), sort_keys=True, default=str),
    }
    detected = base_model_version(models)
    if detected is not None:
        ss_version, architecture, resolution = detected
        meta["ss_base_model_version"] = ss_version
        meta["ss_v2"] = str(ss_version.startswith("sd_v2"))
        meta["modelspec.architecture"] = f"{architecture}/lora"
        meta["modelspec.resolution"] = resolution
        if ss_version.startswith("sdxl"):
            meta["modelspec.implementation"] = "https://github.com/Stability-AI/generative-models"
    else:
        meta["modelspec.architecture"] = "unknown/lora"
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"metadata keys and values must be strings, got {key!r}: {type(value).__name__}")
        meta[key] = value
    return meta


def our_config(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The network configuration we stored, or {} for files from other tools."""
    raw = metadata.get(OUR_PREFIX + "config")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # informative only: a hostile header must not crash a load
        return {}
    return value if isinstance(value, dict) else {}
