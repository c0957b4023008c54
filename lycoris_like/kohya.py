"""A network module that kohya sd-scripts drives unchanged: `--network_module lycoris_like.kohya`.

`train_network.py` / `sdxl_train_network.py` import this module by name, call `create_network`
(or `create_network_from_weights`) and then the methods of the returned `KohyaNetwork`. It wraps
one `AdapterNetwork` over `{"lora_te": te, "lora_unet": unet}` (SDXL: `lora_te1`, `lora_te2`), so
the file names are the ones kohya, ComfyUI and AUTOMATIC1111 read. See docs/kohya.md.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .errors import ConfigError, IncompatibleFileError, ShapeMismatchError
from .loading import network_from_tensors
from .modules import AdapterModule, algorithm_names, get_algorithm
from .network import AdapterNetwork
from .network import create_network as build_network  # this module's own create_network is sd-scripts'
from .presets import BUILTIN_PRESETS

KOHYA_PRESET: dict[str, list[str]] = {"module_classes": ["Transformer2DModel", "CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]}
"""The layers sd-scripts' own `networks/lora.py` adapts: the Linear (and 1×1 conv) layers of the
UNet's transformer blocks and of the text encoders' attention and MLP modules."""
KOHYA_CONV_CLASSES: tuple[str, ...] = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
"""Added to `KOHYA_PRESET` when `conv_dim` is given (LoCon), as `networks/lora.py` does."""

LOADABLE_OPTIONS = frozenset({"dropout", "rank_dropout", "module_dropout", "rank_dropout_scale"})
"""The options that still apply to a network read from a file (the file fixes everything else)."""
_NETWORK_ARGS = frozenset({
    "algo", "preset", "conv_dim", "conv_alpha", "forward_mode", "bypass_mode",
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
})
_ALIASES = {"dora_wd": "weight_decompose", "wd_on_output": "wd_on_out", "use_cp": "use_tucker", "use_conv_cp": "use_tucker"}
"""LyCORIS spellings of our option names."""
_BLOCKWISE = "block-wise ranks and learning rates are not supported; set ranks per layer with `overrides` in a preset TOML (preset=my_preset.toml, docs/presets.md)"
_UNSUPPORTED = {
    **dict.fromkeys(("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                     "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold"), _BLOCKWISE),
    **dict.fromkeys(("constraint", "constrain", "rescaled", "block_size"), "an OFT/BOFT option; lycoris_like has no (B)OFT"),
    "disable_conv_cp": "deprecated in LyCORIS; use use_tucker=True",
    "train_t5xxl": "only SD1.x/2.x and SDXL text encoders are supported",
}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


# ----------------------------------------------------------------------------- network_args


@dataclass(frozen=True)
class KohyaArgs:
    """`--network_args`, parsed and typed."""

    algo: str = "lora"
    preset: str = "kohya"
    conv_dim: int | None = None
    conv_alpha: float | None = None
    forward_mode: str = "auto"
    loraplus: tuple[float | None, float | None, float | None] = (None, None, None)
    """LoRA+ ratios: any, UNet, text encoders (the more specific one wins)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The algorithm's options (`dropout`, `use_tucker`, `factor`, …)."""


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"network_args {name}={value!r}: expected a boolean (true/false, 1/0, yes/no)")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"network_args {name}={value!r}: expected an integer")
    try:
        return int(str(value).strip())
    except ValueError:
        raise ConfigError(f"network_args {name}={value!r}: expected an integer") from None


def _float(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"network_args {name}={value!r}: expected a number") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"network_args {name}={value!r}: expected a finite number")
    return number


_PARSERS = {bool: _bool, int: _int, float: _float, str: lambda name, value: str(value)}


def option_types(algo: str) -> dict[str, type]:
    """The type of each option of `algo`, read from the defaults of its keyword-only arguments."""
    defaults = get_algorithm(algo).option_defaults()
    return {name: type(default) if type(default) in _PARSERS else str for name, default in defaults.items()}


def _unknown(spelled: str, algo: str, accepted: Iterable[str]) -> ConfigError:
    """The error for an argument `algo` does not take, as the user spelled it."""
    name = _ALIASES.get(spelled, spelled)
    if name in _UNSUPPORTED:
        return ConfigError(f"network_args {spelled}: {_UNSUPPORTED[name]}")
    owners = [a for a in algorithm_names() if name in get_algorithm(a).option_names() and get_algorithm(a).algo == a]
    if owners:
        return ConfigError(f"network_args {spelled}: an option of {', '.join(owners)}, not of algo={algo}")
    accepted = sorted(accepted)
    close = difflib.get_close_matches(spelled, accepted, 1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"network_args {spelled}: unknown argument{hint}; accepted for algo={algo}: {', '.join(accepted)}")


def parse_network_args(kwargs: Mapping[str, Any], neuron_dropout: float | None = None) -> KohyaArgs:
    """Typed `KohyaArgs` from sd-scripts' `--network_args` (strings; `None` means not given).

    `neuron_dropout` is sd-scripts' `--network_dropout`; it must agree with a `dropout` argument.
    Every unknown or malformed argument raises `ConfigError` naming it and what is accepted.
    """
    given = {k: v for k, v in kwargs.items() if v is not None}
    algo = str(given.pop("algo", "lora")).strip().lower()
    if algo not in algorithm_names():
        raise ConfigError(f"network_args algo={algo!r}: unknown algorithm; accepted: {', '.join(algorithm_names())}")
    types = option_types(algo)
    options: dict[str, Any] = {}
    network: dict[str, Any] = {}
    for spelled, value in given.items():
        name = _ALIASES.get(spelled, spelled)
        if name in types:
            options[name] = _PARSERS[types[name]](spelled, value)
        elif name in _NETWORK_ARGS:
            network[name] = value
        else:
            raise _unknown(spelled, algo, set(types) | _NETWORK_ARGS | {k for k, v in _ALIASES.items() if v in types})
    if neuron_dropout is not None:
        dropout = _float("network_dropout", neuron_dropout)
        if options.setdefault("dropout", dropout) != dropout:
            raise ConfigError(f"network_args dropout={options['dropout']} disagrees with --network_dropout {dropout}; give one")
    preset = str(network.get("preset", "kohya")).strip()
    if preset != "kohya" and preset not in BUILTIN_PRESETS and not preset.endswith(".toml"):
        raise ConfigError(f"network_args preset={preset!r}: accepted: kohya (default), {', '.join(BUILTIN_PRESETS)}, or a .toml file")
    conv_dim = _int("conv_dim", network["conv_dim"]) if "conv_dim" in network else None
    if conv_dim is not None and conv_dim <= 0:
        raise ConfigError(f"network_args conv_dim={conv_dim}: expected a positive integer (leave it out for no convolutions)")
    forward_mode = str(network.get("forward_mode", "auto")).strip()
    if _bool("bypass_mode", network.get("bypass_mode", False)):
        forward_mode = "bypass"
    ratios = tuple(_float(k, network[k]) if k in network else None
                   for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"))
    return KohyaArgs(
        algo=algo,
        preset=preset,
        conv_dim=conv_dim,
        conv_alpha=_float("conv_alpha", network["conv_alpha"]) if "conv_alpha" in network else None,
        forward_mode=forward_mode,
        loraplus=ratios,  # type: ignore[arg-type]
        options=options,
    )


def kohya_preset(conv: bool) -> dict[str, list[str]]:
    """`KOHYA_PRESET`, with the ResNet/up/downsampler blocks when convolutions are adapted."""
    classes = KOHYA_PRESET["module_classes"] + (list(KOHYA_CONV_CLASSES) if conv else [])
    return {"module_classes": classes}


def pipeline(text_encoder: Any, unet: nn.Module | None, apply_text_encoder: bool = True,
             apply_unet: bool = True) -> dict[str, nn.Module]:
    """`{file prefix: model}` as kohya names them: one text encoder `lora_te`, a list of several
    `lora_te1`, `lora_te2`, …, and the UNet `lora_unet`."""
    models: dict[str, nn.Module] = {}
    if apply_text_encoder and text_encoder is not None:
        encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
        for i, encoder in enumerate(encoders, 1):
            if encoder is not None:
                models["lora_te" if len(encoders) == 1 else f"lora_te{i}"] = encoder
    if apply_unet and unet is not None:
        models["lora_unet"] = unet
    if not models:
        raise ConfigError("nothing to adapt: no text encoder or UNet given (or both switched off)")
    return models


def _read(file: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a `.safetensors` file, or the tensors of a torch `.pt`/`.ckpt` file."""
    if Path(file).suffix != ".safetensors":
        return torch.load(file, map_location="cpu", weights_only=True), {}
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _of(tensors: Mapping[str, Tensor], prefixes: Iterable[str]) -> dict[str, Tensor]:
    """The tensors whose module name starts with one of `prefixes`."""
    starts = tuple(f"{p}_" for p in prefixes)
    return {k: v for k, v in tensors.items() if k.startswith(starts)}


def _with_tensors(models: Mapping[str, nn.Module], tensors: Mapping[str, Tensor], source: str) -> dict[str, nn.Module]:
    """The models that `tensors` holds adapters for; `IncompatibleFileError` when there are none."""
    chosen = {k: m for k, m in models.items() if _of(tensors, [k])}
    if not chosen:
        raise IncompatibleFileError(f"{source} holds no {', '.join(f'{k}_*' for k in models)} tensors")
    return chosen


class Weights(NamedTuple):
    """The tensors a network from `create_network_from_weights` is built from, and where they came from."""

    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    source: str


# ----------------------------------------------------------------------------- the network


class KohyaNetwork(nn.Module):
    """The object sd-scripts trains: builds the `AdapterNetwork` in `apply_to` and answers the
    calls `train_network.py`, `sdxl_train_network.py` and `gen_img*.py` make."""

    def __init__(self, args: KohyaArgs, multiplier: float = 1.0, dim: int = 4, alpha: float = 1.0,
                 weights: Weights | None = None) -> None:
        super().__init__()
        self.args = args
        self.dim = dim
        self.alpha = alpha
        self.multiplier = float(multiplier)
        self.loraplus_lr_ratio, self.loraplus_unet_lr_ratio, self.loraplus_text_encoder_lr_ratio = args.loraplus
        self._weights = weights
        self.network: AdapterNetwork | None = None

    # ------------------------------------------------------------------ building

    def _build(self, models: dict[str, nn.Module]) -> AdapterNetwork:
        if self._weights is not None:
            tensors, metadata, source = self._weights
            options = {k: v for k, v in self.args.options.items() if k in LOADABLE_OPTIONS}
            net = network_from_tensors(models, _of(tensors, models), metadata, multiplier=self.multiplier,
                                       source=source, **options)
            net.set_forward_mode(self.args.forward_mode)
            return net
        a = self.args
        conv_alpha = a.conv_alpha if a.conv_alpha is not None or a.conv_dim is None else 1.0  # networks/lora.py's default
        preset: Any = kohya_preset(a.conv_dim is not None) if a.preset == "kohya" else a.preset
        return build_network(models, a.algo, self.dim, self.alpha, preset=preset, conv_dim=a.conv_dim,
                              conv_alpha=conv_alpha, multiplier=self.multiplier, forward_mode=a.forward_mode, **a.options)

    def apply_to(self, text_encoder: Any, unet: nn.Module | None, apply_text_encoder: bool = True,
                 apply_unet: bool = True) -> None:
        """Attach adapters to the text encoder(s) and/or the UNet (sd-scripts calls this once)."""
        if self.network is not None:
            raise ConfigError("apply_to() was already called on this network")
        models = pipeline(text_encoder, unet, apply_text_encoder, apply_unet)
        if self._weights is not None:
            models = _with_tensors(models, self._weights.tensors, self._weights.source)
        self.network = self._build(models)

    def _require(self, what: str) -> AdapterNetwork:
        if self.network is None:
            raise ConfigError(f"{what}: call apply_to(text_encoder, unet, …) first")
        return self.network

    @property
    def text_encoder_loras(self) -> list[AdapterModule]:
        return [a for path, a in self._adapters() if path.startswith("lora_te")]

    @property
    def unet_loras(self) -> list[AdapterModule]:
        return [a for path, a in self._adapters() if path.startswith("lora_unet.")]

    def _adapters(self) -> list[tuple[str, AdapterModule]]:
        return [] if self.network is None else list(self.network.adapters.items())

    # ------------------------------------------------------------------ runtime

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        if self.network is not None:
            self.network.set_multiplier(self.multiplier)

    def set_enabled(self, is_enabled: bool) -> None:
        net = self._require("set_enabled()")
        net.enable() if is_enabled else net.disable()

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: adapters run inside the host layers, which the host checkpoints."""

    def prepare_grad_etc(self, *models: Any) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, *models: Any) -> None:
        self.train()

    def on_step_start(self, *models: Any) -> None:
        """Called before every step by sd-scripts; nothing to do."""

    def get_trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ optimizer

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio: float | None, loraplus_unet_lr_ratio: float | None,
                              loraplus_text_encoder_lr_ratio: float | None) -> None:
        """LoRA+: `lora_up` weights train at `ratio` × the learning rate."""
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def _groups(self, text_encoder_lrs: Sequence[float | None], unet_lr: float | None,
                default_lr: float | None) -> tuple[list[dict[str, Any]], list[str]]:
        """Per model (and LoRA+ half) one parameter group with its learning rate; groups whose rate
        is 0 or None are left out, as sd-scripts' networks do."""
        net = self._require("prepare_optimizer_params()")
        self.requires_grad_(True)
        keys = list(net.models)
        encoders = [k for k in keys if k.startswith("lora_te")]
        groups: list[dict[str, Any]] = []
        descriptions: list[str] = []
        for key in keys:
            if key == "lora_unet":
                lr, ratio, what = unet_lr, self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio, "unet"
            else:
                index = encoders.index(key)
                lr = text_encoder_lrs[min(index, len(text_encoder_lrs) - 1)] if text_encoder_lrs else None
                ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
                what = "textencoder" + (f" {index + 1}" if len(encoders) > 1 else "")
            lr = default_lr if lr is None else lr
            halves: dict[bool, list[nn.Parameter]] = {False: [], True: []}
            for path, adapter in net.adapters.items():
                if path.split(".", 1)[0] == key:
                    for name, param in adapter.named_parameters():
                        halves[ratio is not None and "lora_up" in name].append(param)
            for plus, params in halves.items():
                rate = None if lr is None or not params else lr * (ratio if plus else 1.0)
                if rate:
                    groups.append({"params": params, "lr": rate})
                    descriptions.append(what + (" plus" if plus else ""))
        return groups, descriptions

    def prepare_optimizer_params(self, text_encoder_lr: float | None = None, unet_lr: float | None = None,
                                 default_lr: float | None = None) -> list[dict[str, Any]]:
        """Parameter groups (a list: sd-scripts ≤ 0.8 passes it to the optimizer as it is; 0.9+
        accepts a list or a `(groups, descriptions)` tuple)."""
        return self._groups([text_encoder_lr], unet_lr, default_lr)[0]

    def prepare_optimizer_params_with_multiple_te_lrs(
        self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None, default_lr: float | None
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """sd-scripts 0.10+: `--text_encoder_lr` may give one rate per text encoder (the last one
        repeats); returns the groups and their names for the logs."""
        if text_encoder_lr is None or isinstance(text_encoder_lr, (int, float)):
            lrs: list[float | None] = [text_encoder_lr]
        else:
            lrs = list(text_encoder_lr)
        return self._groups(lrs, unet_lr, default_lr)

    # ------------------------------------------------------------------ files

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: Mapping[str, str] | None) -> None:
        """A `.safetensors` file with our metadata plus sd-scripts' (theirs wins); other suffixes
        get a torch state dict of the same tensors, as sd-scripts does for `.pt`/`.ckpt`."""
        net = self._require("save_weights()")
        if Path(file).suffix == ".safetensors":
            net.save(file, dtype=dtype, metadata=dict(metadata) if metadata else None)
        else:
            torch.save(net.file_state_dict(dtype=dtype), file)

    def load_weights(self, file: str | os.PathLike) -> dict[str, Any]:
        """Load a file's values into the adapters built by `apply_to` (sd-scripts' `--network_weights`).
        Layers the file lacks keep their values; a layer the file describes differently (another
        algorithm, rank or options) raises `IncompatibleFileError` before anything changes."""
        net = self._require("load_weights()")
        tensors, metadata = _read(file)
        loaded = network_from_tensors(net.models, _of(tensors, net.models), metadata, strict=False, source=str(file))
        try:
            states = {}
            for path, adapter in net.adapters.items():
                if path in loaded.adapters:
                    states[path] = self._state_for(path, adapter, loaded.adapters[path])
            unexpected = sorted(set(loaded.adapters) - set(net.adapters))
            if unexpected:
                raise IncompatibleFileError(f"{file} adapts layers this network does not: {', '.join(unexpected)}", keys=unexpected)
        finally:
            loaded.remove()
        with torch.no_grad():
            for path, state in states.items():
                net.adapters[path].load_state_dict(state)
        missing = sorted(set(net.adapters) - set(states))
        return {"loaded": len(states), "missing": missing, "unmatched_keys": loaded.load_report.unmatched_keys}

    @staticmethod
    def _state_for(path: str, ours: AdapterModule, theirs: AdapterModule) -> dict[str, Tensor]:
        mine, state = ours.state_dict(), theirs.state_dict()
        if type(ours) is not type(theirs) or mine.keys() != state.keys():
            raise IncompatibleFileError(
                f"{path}: the file holds {theirs.algo} {sorted(state)}, this network {ours.algo} {sorted(mine)} "
                "(another algorithm or options, e.g. use_scalar, which files fold into lora_up)", keys=[path])
        for key, value in state.items():
            if value.shape != mine[key].shape:
                raise ShapeMismatchError(f"{path}.{key}: the file has shape {tuple(value.shape)}, this network "
                                         f"{tuple(mine[key].shape)} (another rank or options)", keys=[f"{path}.{key}"])
        return state

    # ------------------------------------------------------------------ merging

    def is_mergeable(self) -> bool:
        return True

    def merge_to(self, text_encoder: Any, unet: nn.Module | None, weights_sd: Mapping[str, Tensor] | None = None,
                 dtype: torch.dtype | None = None, device: Any = None) -> None:
        """Merge a file into the models for good (sd-scripts' `--base_weights`, gen_img's merge).
        The weights keep their dtype and device; `dtype` and `device` are accepted and unused."""
        if weights_sd is not None:
            tensors, metadata = dict(weights_sd), {}
        elif self._weights is not None:
            tensors, metadata = self._weights.tensors, self._weights.metadata
        else:
            raise ConfigError("merge_to() needs weights_sd, or a network from create_network_from_weights")
        models = _with_tensors(pipeline(text_encoder, unet), tensors, "weights_sd")
        network_from_tensors(models, _of(tensors, models), metadata, multiplier=self.multiplier).fold()

    def backup_weights(self) -> None:
        """Nothing to do: `pre_calculation` merges keeping the exact originals."""

    def pre_calculation(self) -> None:
        """Merge into the weights for fast generation (gen_img's `--network_pre_calc`)."""
        net = self._require("pre_calculation()")
        if not net.merged:
            net.merge()

    def restore_weights(self) -> None:
        """Undo `pre_calculation`, bit-exactly."""
        net = self._require("restore_weights()")
        if net.merged:
            net.unmerge()


# ----------------------------------------------------------------------------- what sd-scripts calls


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae: Any,
                   text_encoder: Any, unet: nn.Module | None, neuron_dropout: float | None = None,
                   **kwargs: Any) -> KohyaNetwork:
    """sd-scripts' entry point: `--network_dim`, `--network_alpha`, `--network_dropout` and the
    `--network_args` strings. The adapters are built by `apply_to`; arguments are checked here."""
    args = parse_network_args(kwargs, neuron_dropout)
    dim = 4 if network_dim is None else _int("network_dim", network_dim)
    alpha = 1.0 if network_alpha is None else _float("network_alpha", network_alpha)
    return KohyaNetwork(args, multiplier, dim, alpha)


def create_network_from_weights(multiplier: float, file: str | os.PathLike | None, vae: Any, text_encoder: Any,
                                unet: nn.Module | None, weights_sd: Mapping[str, Tensor] | None = None,
                                for_inference: bool = False, **kwargs: Any) -> tuple[KohyaNetwork, dict[str, Tensor]]:
    """A network shaped by a file (`--dim_from_weights`, `--base_weights`, gen_img). The file fixes
    algorithm, ranks and options; of `--network_args` only dropouts and forward_mode apply."""
    args = parse_network_args(kwargs)
    if weights_sd is None:
        if file is None:
            raise ConfigError("create_network_from_weights needs a file or weights_sd")
        tensors, metadata = _read(file)
    else:
        tensors, metadata = dict(weights_sd), {}
    source = "weights_sd" if weights_sd is not None else str(file)
    _with_tensors(pipeline(text_encoder, unet), tensors, source)
    return KohyaNetwork(args, multiplier, weights=Weights(tensors, metadata, source)), tensors
