"""A new algorithm in one file: VeRA (Kopiczko et al. 2024). ΔW = diag(b)·B·diag(d)·A, with A and B
frozen random matrices and only the vectors d (rank) and b (output channels) trained; b = 0 at init.
The worked example of docs/extending.md, run end to end by tests/test_extending.py."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lycoris_like.modules import AdapterModule, Bypass, expect_shape, register_algorithm, require_keys

KEYS = ("vera_A", "vera_B", "vera_d", "vera_b")


@register_algorithm("vera")
class VeRA(Bypass, AdapterModule):
    """`dim` is the rank of the frozen A (dim, in·k…) and B (out, dim); `d_init` starts d; `seed` draws A, B."""

    file_keys = signature_keys = frozenset(KEYS)

    def __init__(self, host, dim: int = 16, alpha: float | None = None, *, d_init: float = 0.1, seed: int = 0, **common) -> None:
        super().__init__(host, **common)
        fan_in, g = host.in_features * host.kernel_numel, torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(fan_in)
        self.register_buffer("vera_A", ((torch.rand(dim, fan_in, generator=g) * 2 - 1) * bound).to(**self.factory()))
        self.register_buffer("vera_B", ((torch.rand(host.out_features, dim, generator=g) * 2 - 1) / math.sqrt(dim)).to(**self.factory()))
        self.vera_d = nn.Parameter(torch.full((dim,), float(d_init), **self.factory()))
        self.vera_b = nn.Parameter(torch.zeros(host.out_features, **self.factory()))

    def delta_weight(self, train: bool = False) -> Tensor:
        up, down = self.vera_b[:, None] * self.vera_B, self.vera_d[:, None] * self.vera_A
        return (up @ down).reshape(self.host.weight.shape)

    def fast_path(self, train: bool) -> str | None:  # the bypass runs down as a conv: not on grouped convs
        return "bypass" if self.host.groups == 1 else None

    def bypass(self, x: Tensor, train: bool = False) -> Tensor:
        host, rank = self.host, self.vera_d.shape[0]
        down = (self.vera_d[:, None] * self.vera_A).reshape(rank, host.in_features, *host.kernel_size)
        up = (self.vera_b[:, None] * self.vera_B).reshape(host.out_features, rank, *host.ones)
        return host.pointwise(host.op(x, down.to(x.dtype), None), up.to(x.dtype))

    def file_tensors(self) -> dict[str, Tensor]:
        return {key: getattr(self, key).detach() for key in KEYS}

    @classmethod
    def from_file_tensors(cls, host, tensors, name: str, **options) -> VeRA:
        require_keys(tensors, name, KEYS)
        module = cls(host, tensors["vera_d"].shape[0], **options)
        with torch.no_grad():
            for key in KEYS:
                getattr(module, key).copy_(expect_shape(name, key, tensors[key], tuple(getattr(module, key).shape)))
        return module

    def config(self) -> dict:
        return {"algo": self.algo, "dim": self.vera_d.shape[0]}
