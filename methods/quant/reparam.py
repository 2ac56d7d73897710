"""Exact reparameterisation of a LayerNorm and the Linear layers that read its output.

The LayerNorm output x becomes x' = (x + shift) / ratio per channel, by changing the LayerNorm
affine (gamma' = gamma / ratio, beta' = (beta + shift) / ratio); every following Linear absorbs the
inverse (W' = W * ratio over input channels, b' = b - W @ shift), so the network computes the same
function in floating point. RepQ-ViT uses this to turn a channel-wise post-LayerNorm activation
quantizer into a per-tensor one (ratio = s_c / mean(s), shift from the zero points); SmoothQuant-
style scaling (MPTQ-ViT's SQ-b) is the shift-free, per-channel-scale case.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


@torch.no_grad()
def fold_into_layernorm(norm: nn.LayerNorm, linears: Sequence[nn.Linear], ratio: Tensor,
                        shift: Tensor | None = None) -> None:
    """Rescale and shift ``norm``'s output per channel, compensated in ``linears`` (in place).

    ``ratio`` (C,) must be positive; ``shift`` (C,) defaults to 0. The norm needs an affine.
    """
    if norm.weight is None or norm.bias is None:
        raise ValueError("fold_into_layernorm: the LayerNorm needs elementwise_affine=True with a bias")
    ratio = ratio.to(norm.weight)
    if (ratio <= 0).any():
        raise ValueError("fold_into_layernorm: every ratio must be positive")
    shift = torch.zeros_like(ratio) if shift is None else shift.to(norm.weight)
    for lin in linears:
        if lin.in_features != ratio.numel():
            raise ValueError(f"fold_into_layernorm: {lin} does not read {ratio.numel()} channels")
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                device=lin.weight.device))
        lin.bias.sub_(lin.weight @ shift)  # uses the original W: W (x' * ratio - shift) + b = W x + b
        lin.weight.mul_(ratio)
    norm.weight.div_(ratio)
    norm.bias.add_(shift).div_(ratio)


__all__ = ["fold_into_layernorm"]
