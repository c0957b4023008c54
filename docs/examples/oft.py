"""A new algorithm in one file: orthogonal fine-tuning (OFT) of the output channels.

OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning") keeps a
layer's weight W and rotates its output channels: W′ = R·W with R block-diagonal and orthogonal.
Each b×b block of R is the Cayley transform of a skew-symmetric Q = A − Aᵀ of a trained A:

    R = (I + Q)(I − Q)⁻¹,   so   ΔW = W′ − W = (R − I)·W = 2(I − Q)⁻¹Q · W

which is exactly zero while A = 0 (the identity at init every algorithm needs). The block size b
is `dim` (`conv_dim` for convolutions), lowered to the largest divisor of the layer's output
channels when it does not divide them.

This is the worked example of docs/extending.md; `tests/test_docs_examples.py` imports it and runs
it through create_network, training, merge, save and load. Its file key, `oft_example_blocks`, is
its own: this is not LyCORIS's `diag-oft` file format.

    python docs/examples/oft.py        # train it in the demo: save, reload, merge, check
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lycoris_like import AdapterModule, IncompatibleFileError, ShapeMismatchError, register_algorithm

KEY = "oft_example_blocks"


def block_size(channels: int, wanted: int) -> int:
    """The largest divisor of `channels` that is at most `wanted`."""
    return next(b for b in range(min(wanted, channels), 0, -1) if channels % b == 0)


@register_algorithm("oft-example")
class OFT(AdapterModule):
    """W′ = R·W, R block-diagonal orthogonal (Cayley), blocks of `dim` output channels; `alpha`
    is accepted and ignored. The bias is not changed."""

    file_keys = frozenset({KEY})  # every key suffix the algorithm reads and writes
    signature_keys = frozenset({KEY})  # the suffixes that identify it in a file

    def __init__(self, host, dim: int = 8, alpha: float | None = None, **common: Any) -> None:
        super().__init__(host, **common)  # checks the layer kind and the common options
        self.block = block_size(host.out_features, dim)
        blocks = host.out_features // self.block
        # Parameters in the compute dtype (float32 for fp16/bf16 hosts), on the host's device.
        self.oft_example_blocks = nn.Parameter(torch.zeros(blocks, self.block, self.block, **self.factory()))

    def delta_weight(self, train: bool = False) -> Tensor:
        """ΔW in the host weight's shape: 2(I − Q)⁻¹Q·W per block of output channels."""
        a = self.oft_example_blocks
        q = a - a.transpose(1, 2)
        eye = torch.eye(self.block, dtype=a.dtype, device=a.device)
        rotation_minus_eye = torch.linalg.solve(eye - q, 2 * q)  # (I − Q)⁻¹ and Q commute
        weight = self.host.weight.to(a.dtype).reshape(a.shape[0], self.block, -1)
        return (rotation_minus_eye @ weight).reshape(self.host.weight.shape)

    # ---------------------------------------------------------------- the file layout

    def file_tensors(self) -> dict[str, Tensor]:
        return {KEY: self.oft_example_blocks.detach()}

    @classmethod
    def from_file_tensors(cls, host, tensors: Mapping[str, Tensor], name: str, **options: Any) -> OFT:
        if KEY not in tensors:
            raise IncompatibleFileError(f"missing {name}.{KEY}", keys=[f"{name}.{KEY}"])
        blocks = tensors[KEY]
        n_out = host.out_features
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2] or blocks.shape[0] * blocks.shape[1] != n_out:
            raise ShapeMismatchError(
                f"{name}.{KEY}: expected (n, b, b) blocks with n·b = {n_out} output channels, "
                f"found {tuple(blocks.shape)}",
                keys=[f"{name}.{KEY}"],
            )
        module = cls(host, blocks.shape[1], **options)
        with torch.no_grad():
            module.oft_example_blocks.copy_(blocks)
        return module

    def config(self) -> dict[str, Any]:
        return {"algo": self.algo, "block_size": self.block}


def main(steps: int = 100, out_dir: str = "demo_out"):
    """Run the algorithm through the demo (train, save, reload, merge, check); returns its result."""
    from lycoris_like.demo import run

    return run("oft-example", steps, out_dir)


if __name__ == "__main__":
    raise SystemExit(0 if main().ok else 1)
