"""Inter-head attention similarity (MimiQ's generation prior).

For every query patch, each head's pre-softmax attention logits over the keys form a map; MimiQ
min-max normalises the maps and pushes every pair of heads towards a structurally identical map with
a *global* SSIM (one window covering the whole map), loss ``mean(1 - SSIM²)`` over layers, images,
queries and head pairs (MaskAQ/hydra_image_gen_ssim_att_map.py:246-304).

The released code reshapes the key vector to a 14×14 (ViT at 224 px) or 7×7 (Swin window) map before
taking means over it; a global SSIM only uses means over all keys, so the map's shape is irrelevant
and any patch grid or window size works: the functions here take the key vector as it is. The SSIM
itself is :func:`methods.synth.ssim.pairwise_global_ssim`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from methods.synth.ssim import pairwise_global_ssim


def minmax_normalize(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``(x - min) / (max(x - min) + eps)`` along ``dim`` (MimiQ: eps 1e-8 on the max only)."""
    # min / max picked with gather: same values and gradients as amin / amax (barring exact ties, where
    # amax splits the gradient), but a cheaper backward (a scatter instead of an equality mask)
    lo = x.gather(dim, x.argmin(dim, keepdim=True))
    hi = x.gather(dim, x.argmax(dim, keepdim=True))
    return (x - lo) / (hi - lo + eps)


def inter_head_ssim(logits: Tensor, drop_tokens: int = 0) -> Tensor:
    """One block's attention logits (B', H, N, N) -> (B', N', H, H) inter-head SSIM per query.

    ``drop_tokens`` leading tokens (CLS / distillation) are removed from both the query and the key
    axis; each remaining query's key vector is min-max normalised per head.
    """
    if logits.dim() != 4:
        raise ValueError(f"expected attention logits (B', H, N, N), got {tuple(logits.shape)}")
    a = logits[:, :, drop_tokens:, drop_tokens:]
    maps = minmax_normalize(a.transpose(1, 2))  # (B', N', H, N')
    return pairwise_global_ssim(maps)


def inter_head_similarity_loss(logits: Sequence[Tensor], drop_tokens: int = 0) -> Tensor:
    """MimiQ's L_IH: mean over blocks of ``mean(1 - SSIM²)`` over images (windows), queries and all
    H×H head pairs (diagonal included, where it is 0).

    The released ViT code stacks the blocks and takes one mean; with equally sized blocks that is the
    mean of the per-block means, which is the Swin code's form and is used for both.
    """
    if not logits:
        raise ValueError("inter_head_similarity_loss needs at least one block's logits (prepared model?)")
    per_block = [(1 - inter_head_ssim(x, drop_tokens).pow(2)).mean() for x in logits]
    return torch.stack(per_block).mean()
