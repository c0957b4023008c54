"""Host layers: the torch layers an adapter can attach to, and the host's own op.

Every adapted forward goes through `HostLayer.op`, which for convolutions is the host's own
`_conv_forward`, so stride, padding, dilation, groups and `padding_mode` can never disagree with
the layer being adapted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UnsupportedLayerError

_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Linear, "linear"),
    (nn.Conv1d, "conv1d"),
    (nn.Conv2d, "conv2d"),
    (nn.Conv3d, "conv3d"),
    (nn.Embedding, "embedding"),
    (nn.LayerNorm, "layernorm"),
    (nn.GroupNorm, "groupnorm"),
)
LINEAR_AND_CONV = frozenset({"linear", "conv1d", "conv2d", "conv3d"})
NORMS = frozenset({"layernorm", "groupnorm"})
# Subclasses whose forward is the plain op when no legacy LoRA layer is set on them.
_PLAIN_SUBCLASSES = {"LoRACompatibleLinear", "LoRACompatibleConv"}
# Entries per block of a blockwise weight gradient: 16 MB of float32, below glibc's largest mmap
# threshold (32 MB), so successive blocks reuse heap memory instead of faulting in fresh pages.
_GRAD_BLOCK = 1 << 22


def host_kind(module: nn.Module) -> str | None:
    """The host kind of `module`, or None when no algorithm can adapt it."""
    if getattr(module, "weight", None) is None:  # norms without affine parameters
        return None
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        return None  # max_norm renormalises the weight in place; sparse gradients are not ours
    for cls, kind in _KINDS:
        if isinstance(module, cls):
            if type(module).forward is cls.forward:
                return kind
            if type(module).__name__ in _PLAIN_SUBCLASSES and getattr(module, "lora_layer", None) is None:
                return kind
            return None
    return None


@dataclass(frozen=True, eq=False)
class HostLayer:
    """A layer seen as `y = op(x, W, b)`: Linear, Conv1d/2d/3d, and for the algorithms that
    support them Embedding, LayerNorm and GroupNorm (1-D weights)."""

    module: nn.Module
    kind: str

    @classmethod
    def of(cls, module: nn.Module, where: str = "") -> HostLayer:
        kind = host_kind(module)
        if kind is None:
            at = f" at {where!r}" if where else ""
            raise UnsupportedLayerError(
                f"cannot adapt {type(module).__name__}{at}: supported layers are nn.Linear, "
                "nn.Conv1d/2d/3d, nn.Embedding and affine nn.LayerNorm/GroupNorm (and subclasses "
                "that keep their forward)"
            )
        return cls(module, kind)

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None)  # nn.Embedding has none

    @property
    def is_conv(self) -> bool:
        return self.kind.startswith("conv")

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        """Input features per group (the weight's second dimension; 1 for 1-D weights)."""
        return self.weight.shape[1] if self.weight.dim() > 1 else 1

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def spatial(self) -> int:
        """The number of spatial dims of the op: 0 for Linear (and 1-D weights), 1–3 for convs."""
        return self.weight.dim() - 2 if self.is_conv else 0

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def groups(self) -> int:
        return getattr(self.module, "groups", 1)

    @property
    def ones(self) -> tuple[int, ...]:
        """Trailing singleton dims of a pointwise (1×1) conv weight; empty for Linear."""
        return (1,) * len(self.kernel_size)

    def op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The host's own op with another weight and bias."""
        m = self.module
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.is_conv:
            return m._conv_forward(x, weight, bias)
        if self.kind == "embedding":
            return F.embedding(x, weight, m.padding_idx, None, m.norm_type, m.scale_grad_by_freq, False)
        if self.kind == "layernorm":
            return F.layer_norm(x, m.normalized_shape, weight, bias, m.eps)
        return F.group_norm(x, m.num_groups, weight, bias, m.eps)

    def op_fn(self) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
        """`op` as the one function it calls for this kind (no per-call dispatch): for plans."""
        if self.kind == "linear":
            return F.linear
        if self.is_conv:
            return self.module._conv_forward
        return self.op

    def tensor_getter(self, name: str) -> Callable[[], Tensor | None]:
        """A fast getter of the host's `weight` or `bias` for plans: a lookup in the module's own
        parameter dict (which FSDP and re-assignment update), or the attribute where the tensor
        is not a plain parameter (a parametrization, a buffer, a property)."""
        params = self.module._parameters
        if name in params:
            return lambda: params[name]
        module = self.module
        return lambda: getattr(module, name, None)

    @property
    def has_op_grads(self) -> bool:
        """Whether `op_grads` is available (Linear, and convs with numeric padding)."""
        return self.kind == "linear" or (self.is_conv and not isinstance(self.module.padding, str))

    def op_grads(
        self, x: Tensor, weight: Tensor, grad_y: Tensor, needs: tuple[bool, bool, bool]
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Gradients of `op(x, weight, bias)` w.r.t. x, weight and bias, in one pass where the
        backend allows (for `kernels.rebuild`, which must not keep the rebuilt weight alive)."""
        need_x, need_w, need_b = needs
        if self.kind == "linear":
            g2 = grad_y.reshape(-1, grad_y.shape[-1])
            grad_x = grad_y @ weight if need_x else None
            grad_w = g2.T @ x.reshape(-1, x.shape[-1]) if need_w else None
            grad_b = g2.sum(0) if need_b else None
            return grad_x, grad_w, grad_b
        m = self.module
        x_in, grad_y, padding, unbatched = self._conv_operands(x, grad_y)
        grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_y, x_in, weight, [weight.shape[0]] if need_b else None, m.stride, padding, m.dilation,
            False, (0,) * len(padding), m.groups, [need_x, need_w, need_b],
        )
        if need_x and m.padding_mode != "zeros":  # the adjoint of the padding (reflect/replicate/circular)
            x_req = (x.unsqueeze(0) if unbatched else x).detach().requires_grad_(True)
            with torch.enable_grad():
                (grad_in,) = torch.autograd.grad(F.pad(x_req, m._reversed_padding_repeated_twice, mode=m.padding_mode), x_req, grad_in)
        if unbatched and grad_in is not None:
            grad_in = grad_in.squeeze(0)
        return grad_in, grad_w, grad_b

    def _conv_operands(self, x: Tensor, grad_y: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...], bool]:
        """(x padded by `padding_mode` and batched, grad_y batched, the padding left for the
        convolution, whether the input was unbatched)."""
        m, dims = self.module, len(self.kernel_size)
        unbatched = x.dim() == dims + 1
        if unbatched:
            x, grad_y = x.unsqueeze(0), grad_y.unsqueeze(0)
        if m.padding_mode != "zeros":
            return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), grad_y, (0,) * dims, unbatched
        return x, grad_y, tuple(m.padding), unbatched

    def weight_grad_at(self, x: Tensor, grad_y: Tensor, index: Tensor) -> Tensor:
        """∇W of `op` at the flat C-order indices `index` (int64, increasing), computed over blocks
        of output rows: no dense ∇W of a large layer is formed at once (its fresh memory costs
        more than the arithmetic) — the sparse weight gradient SaRA trains with."""
        rows_of = self._weight_grad_rows(x, grad_y)
        rows, row = self.out_features, self.weight[0].numel()
        block = rows if self.groups > 1 else max(1, _GRAD_BLOCK // max(row, 1))
        if block >= rows:
            return rows_of(0, rows).reshape(-1).index_select(0, index)
        starts = torch.arange(0, rows + block, block, device=index.device).clamp_(max=rows)
        bounds = torch.searchsorted(index, starts * row).tolist()
        out = grad_y.new_empty(index.shape)
        for k, (start, stop) in enumerate(zip(starts.tolist(), starts[1:].tolist())):
            lo, hi = bounds[k], bounds[k + 1]
            if lo < hi:
                torch.index_select(rows_of(start, stop).reshape(-1), 0, index[lo:hi] - start * row, out=out[lo:hi])
        return out

    def _weight_grad_rows(self, x: Tensor, grad_y: Tensor) -> Callable[[int, int], Tensor]:
        """(start, stop) → ∇W[start:stop] over output rows (grouped convolutions: all rows only)."""
        if self.kind == "linear":
            g2, x2 = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
            return lambda start, stop: g2[:, start:stop].T @ x2
        m, weight = self.module, self.weight.detach()
        x_in, grad_y, padding, _ = self._conv_operands(x, grad_y)
        return lambda start, stop: torch.ops.aten.convolution_backward(
            grad_y[:, start:stop], x_in, weight[start:stop], None, m.stride, padding, m.dilation,
            False, (0,) * len(padding), m.groups, [False, True, False],
        )[1]

    def pointwise(self, x: Tensor, weight: Tensor) -> Tensor:
        """A bias-free 1×1 map over channels (Linear for linear hosts)."""
        matrix = weight.reshape(weight.shape[0], -1)
        if self.kind == "linear":
            return F.linear(x, matrix)
        # A matmul over the channel axis, not a 1×1 conv: PyTorch's CPU conv falls back to its slow
        # unvectorised path for few input channels (a rank-4 `lora_up`).
        channel = x.dim() - len(self.kernel_size) - 1  # 0 unbatched, 1 batched
        return torch.matmul(matrix, x.flatten(channel + 1)).unflatten(-1, x.shape[channel + 1:])

    def pointwise_add(self, out: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        """`out + pointwise(x, weight)` with the addition inside the matmul (addmm / baddbmm):
        one pass over the output instead of three."""
        matrix = weight.reshape(weight.shape[0], -1)
        if self.kind == "linear":
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), matrix.T)
            return flat.reshape(out.shape)
        channel = x.dim() - len(self.kernel_size) - 1  # 0 unbatched, 1 batched
        if channel == 0:
            return torch.addmm(out.flatten(1), matrix, x.flatten(1)).reshape(out.shape)
        batched = matrix.expand(x.shape[0], *matrix.shape)
        return torch.baddbmm(out.flatten(2), batched, x.flatten(2)).reshape(out.shape)

    def tokens(self, x: Tensor) -> int:
        """How many positions the layer is applied at for input `x` (cost-model input)."""
        if self.kind == "linear":
            return x.numel() // max(x.shape[-1], 1)
        if not self.is_conv:
            return x.numel() if self.kind == "embedding" else x.numel() // max(self.out_features, 1)
        dims = len(self.kernel_size)
        positions = 1
        for size, stride in zip(x.shape[-dims:], self.module.stride):
            positions *= max(size // stride, 1)
        batch = x.numel() // max(x.shape[-dims - 1] * math.prod(x.shape[-dims:]), 1)
        return batch * positions


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision merges and rebuilds compute in: fp32, or fp64 for fp64 hosts."""
    return torch.promote_types(dtype, torch.float32)
