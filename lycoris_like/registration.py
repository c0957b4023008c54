"""Opt-in: a network's adapters as submodules of the model they adapt.

By default the host model's parameters and `state_dict()` are its own. Training scripts written
for diffusers/accelerate look only at the model — `filter(lambda p: p.requires_grad,
unet.parameters())`, `unet.state_dict()`, `accelerator.prepare(unet)`, DDP around the UNet alone —
so `register(network, unet)` adds the adapters that sit in `unet` under `unet.lycoris_like`
(state-dict keys `lycoris_like.<file module name>.<parameter>`), and `unregister` takes them out.
"""

from __future__ import annotations

from torch import nn

from .errors import ConfigError
from .modules import AdapterModule
from .network import AdapterNetwork

DEFAULT_NAME = "lycoris_like"


class RegisteredAdapters(nn.Module):
    """The adapters of one network whose host layers are in one model, under their file names.
    The network is referenced, not registered, so the model gains only these adapters."""

    def __init__(self, network: AdapterNetwork, model: nn.Module) -> None:
        super().__init__()
        self.owner = (network,)  # a tuple: not a submodule
        hosts = {id(m) for m in model.modules()}
        for name, child in network.named_children():
            if isinstance(child, AdapterModule) and id(child.host.module) in hosts:
                self.add_module(name, child)

    @property
    def network(self) -> AdapterNetwork:
        return self.owner[0]


def register(network: AdapterNetwork, model: nn.Module, name: str = DEFAULT_NAME) -> RegisteredAdapters:
    """Add `network`'s adapters on `model`'s layers to `model` as the submodule `name`.

    Freeze the model before (`model.requires_grad_(False)` afterwards freezes the adapters too),
    and note that `model.to(dtype)` now casts them as well. Returns the registered module.
    """
    if not isinstance(network, AdapterNetwork):
        raise ConfigError(f"register() takes an AdapterNetwork, got {type(network).__name__}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"register() takes the model as a torch.nn.Module, got {type(model).__name__}")
    if not name.isidentifier() or hasattr(model, name):
        raise ConfigError(f"cannot register under {name!r}: not a valid name, or the model already has that attribute")
    view = RegisteredAdapters(network, model)
    if not len(view._modules):
        raise ConfigError(f"the network has no adapter on a layer of this {type(model).__name__}")
    if any(m is model for m in view.modules()):
        raise ConfigError("registering would make the model a submodule of itself")
    model.add_module(name, view)
    return view


def registered(model: nn.Module, network: AdapterNetwork | None = None) -> list[tuple[nn.Module, str]]:
    """`(parent, name)` of every registration under `model` (of `network`, or of any network)."""
    found = []
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, RegisteredAdapters) and (network is None or child.network is network):
                found.append((parent, child_name))
    return found


def unregister(network: AdapterNetwork, model: nn.Module | None = None) -> int:
    """Take `network`'s adapters out of `model` (default: every model of the network), leaving
    its parameters and `state_dict()` keys as before `register`. Returns how many registrations
    were removed; the network itself stays attached (`network.remove()` detaches it)."""
    models = network.models.values() if model is None else [model]
    removed = 0
    for root in models:
        for parent, child_name in registered(root, network):
            delattr(parent, child_name)
            removed += 1
    return removed
