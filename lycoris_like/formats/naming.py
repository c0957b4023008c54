"""Module paths ↔ kohya/LyCORIS file names (FORMATS.md §1).

`name = prefix + "_" + path.replace(".", "_")` is lossy, so names are only ever computed forward
from a model's `named_modules()` and looked up — never parsed back into paths.
"""

from __future__ import annotations

from torch import nn

KNOWN_PREFIXES = ("lora_unet", "lora_te1", "lora_te2", "lora_te3", "lora_te", "lora_transformer", "lycoris")


def default_prefix(model: nn.Module) -> str:
    """The prefix consumers expect for a lone model: UNet/DiT, text encoder, or LyCORIS's own."""
    origin = type(model).__module__
    if origin.startswith("diffusers."):
        return "lora_unet"
    if origin.startswith("transformers.") and "TextModel" in type(model).__name__:
        return "lora_te"
    return "lycoris"


def _lacks_text_model_level(model: nn.Module) -> bool:
    # transformers 5 flattened CLIPTextModel; consumers still expect `text_model_` in names.
    return type(model).__name__ == "CLIPTextModel" and not hasattr(model, "text_model")


def file_path(model: nn.Module, path: str) -> str:
    """A module path as files spell it (the `text_model.` level of CLIP is always present)."""
    if _lacks_text_model_level(model):
        return "text_model." + path if path else "text_model"
    return path


def module_name(prefix: str, model: nn.Module, path: str) -> str:
    spelled = file_path(model, path)
    return f"{prefix}_{spelled.replace('.', '_')}" if spelled else prefix


def accepted_names(prefix: str, model: nn.Module, path: str) -> list[str]:
    """Every name a reader accepts for `path`: ours first, then the spelling without `text_model_`."""
    names = [module_name(prefix, model, path)]
    spelled = file_path(model, path)
    if spelled.startswith("text_model."):
        names.append(f"{prefix}_{spelled[len('text_model.'):].replace('.', '_')}")
    return names


def split_prefix(name: str, prefixes: tuple[str, ...] = KNOWN_PREFIXES) -> str | None:
    """The longest prefix `name` starts with (followed by `_` or the end), or None."""
    for prefix in sorted(prefixes, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "_"):
            return prefix
    return None
