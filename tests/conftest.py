"""Shared fixtures: small real models built from configs, and the host-layer matrix of TESTING.md."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(2)
logging.getLogger("lycoris").setLevel(logging.ERROR)

SMALL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
SMALL_CLIP = dict(
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=1000,
    projection_dim=24,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


def make_unet(seed: int = 0, **changes) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**SMALL_UNET, **changes}).eval()


def unet_inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor([10, 500][:batch] + [3] * max(batch - 2, 0)),
        torch.randn(batch, 7, SMALL_UNET["cross_attention_dim"], generator=g),
    )


def make_clip(seed: int = 0, projection: bool = False) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(**SMALL_CLIP)).eval()


def clip_inputs(batch: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, SMALL_CLIP["vocab_size"], (batch, 9), generator=torch.Generator().manual_seed(seed))


def randomize(module: nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Give every trainable parameter a random value, so adapters do something measurable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


# The host-layer matrix: non-square, multi-channel shapes for every layer type and conv option.
HOSTS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "linear": (lambda: nn.Linear(48, 80), (3, 5, 48)),
    "linear-nobias": (lambda: nn.Linear(48, 80, bias=False), (4, 48)),
    "conv1d-k1": (lambda: nn.Conv1d(12, 20, 1), (2, 12, 9)),
    "conv1d-k3": (lambda: nn.Conv1d(12, 20, 3, padding=1), (2, 12, 9)),
    "conv2d-k1": (lambda: nn.Conv2d(12, 20, 1), (2, 12, 7, 6)),
    "conv2d-k3": (lambda: nn.Conv2d(12, 20, 3, padding=1), (2, 12, 7, 6)),
    "conv2d-k3x1": (lambda: nn.Conv2d(12, 20, (3, 1), padding=(1, 0)), (2, 12, 7, 6)),
    "conv2d-stride2": (lambda: nn.Conv2d(12, 20, 3, stride=2, padding=1), (2, 12, 9, 8)),
    "conv2d-dilation2": (lambda: nn.Conv2d(12, 20, 3, dilation=2, padding=2), (2, 12, 9, 8)),
    "conv2d-groups2": (lambda: nn.Conv2d(12, 20, 3, groups=2, padding=1), (2, 12, 7, 6)),
    "conv2d-reflect": (lambda: nn.Conv2d(12, 20, 3, padding=1, padding_mode="reflect"), (2, 12, 7, 6)),
    "conv2d-circular": (lambda: nn.Conv2d(12, 20, 3, padding=1, padding_mode="circular"), (2, 12, 7, 6)),
    "conv3d-k1": (lambda: nn.Conv3d(12, 20, 1), (1, 12, 4, 5, 6)),
    "conv3d-k3": (lambda: nn.Conv3d(12, 20, 3, padding=1), (1, 12, 4, 5, 6)),
}


# Every algorithm and option variant, for the cross-algorithm property matrix (TESTING.md).
VARIANTS: dict[str, tuple[str, dict]] = {
    "lora": ("lora", {}),
    "lora-tucker": ("lora", {"use_tucker": True}),
    "lora-scalar": ("lora", {"use_scalar": True}),
    "lora-rslora": ("lora", {"rs_lora": True}),
    "lora-dora": ("lora", {"weight_decompose": True}),
    "lora-dora-in": ("lora", {"weight_decompose": True, "wd_on_out": False}),
    "loha": ("loha", {}),
    "loha-tucker": ("loha", {"use_tucker": True}),
    "loha-scalar": ("loha", {"use_scalar": True}),
    "loha-dora": ("loha", {"weight_decompose": True}),
    "lokr": ("lokr", {}),
    "lokr-factor4": ("lokr", {"factor": 4}),
    "lokr-both": ("lokr", {"decompose_both": True, "factor": 4}),
    "lokr-full": ("lokr", {"full_matrix": True}),
    "lokr-unbalanced": ("lokr", {"unbalanced_factorization": True}),
    "lokr-tucker": ("lokr", {"use_tucker": True}),
    "lokr-dora-in": ("lokr", {"weight_decompose": True, "wd_on_out": False}),
    "ia3": ("ia3", {}),
    "ia3-input": ("ia3", {"train_on_input": True}),
    "full": ("full", {}),
    "svdiff": ("svdiff", {}),
    "svdiff-f32": ("svdiff", {"svd_buffers": "float32"}),
    "svdiff-f64": ("svdiff", {"svd_buffers": "float64"}),
    "svdiff-lean": ("svdiff", {"svd_buffers": "lean"}),
    "sara": ("sara", {"threshold": 0.02}),
    "sara-bias": ("sara", {"threshold": 0.02, "train_bias": True}),
}


NONLINEAR_MULTIPLIER = frozenset({"svdiff"})
"""Algorithms whose multiplier is not a plain factor of ΔW (SVDiff: inside a ReLU)."""


def linear_in_multiplier(variant: tuple[str, dict]) -> bool:
    """`variant` as the matrix passes it: (algorithm, options)."""
    return variant[0] not in NONLINEAR_MULTIPLIER


def fast(adapter, x: torch.Tensor) -> bool:
    """Whether the planner sends this call through the adapter's fast path (not the rebuild)."""
    from lycoris_like.plan import choose_path

    return choose_path(adapter, x) != "rebuild"


def has_fast_path(adapter) -> bool:
    """Whether the adapter has a fast path for its host now (training flags as they are)."""
    from lycoris_like.modules import FastPath
    from lycoris_like.plan import adapter_train

    return isinstance(adapter, FastPath) and adapter.fast_path(adapter_train(adapter)) is not None


def make_host(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A host layer wrapped in a Sequential (so it has a path) and an input for it."""
    factory, shape = HOSTS[name]
    torch.manual_seed(seed)
    model = nn.Sequential(factory()).to(dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return model, x


def search_settings(env_var: str, ci_examples: int):
    """hypothesis settings for the property and fuzz suites: `ci_examples` derandomized cases (the
    same every CI run), or, with `env_var` set to a count, that many new random ones (by hand)."""
    from hypothesis import HealthCheck, settings

    long = int(os.environ.get(env_var, "0"))
    return settings(
        max_examples=long or ci_examples,
        deadline=None,
        derandomize=not long,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@pytest.fixture
def one_thread():
    """One torch thread for modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    on a busy two-core machine OpenMP spin-waits make two threads several times slower than one,
    and MKL's SVD of an 80 × 48 matrix up to 100× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(HOSTS))
def host_name(request) -> str:
    return request.param


_MODULE_BIAS = object()


def reference_op(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias=_MODULE_BIAS) -> torch.Tensor:
    """The layer's maths spelled out from its attributes (padding modes through F.pad), not its
    forward — the independent reference every forward test compares with."""
    bias = module.bias if bias is _MODULE_BIAS else bias
    if isinstance(module, nn.Linear):
        y = x @ weight.T
        return y + bias if bias is not None else y
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)], mode=module.padding_mode)
        padding = 0
    return conv(x, weight, bias, module.stride, padding, module.dilation, module.groups)


def saved_numels(model: nn.Module, x: torch.Tensor) -> tuple[int, list[int]]:
    """(the output's numel, the numel of every tensor autograd saves for backward) of one forward
    of `model` on `x`, then its backward — what an adapter keeps alive between the two."""
    out_numel = model(x).numel()
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = model(x)
    y.sum().backward()
    return out_numel, saved


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, for bit-exact comparisons (distinguishes -0.0 and NaNs)."""
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
