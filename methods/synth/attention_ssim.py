"""Inter-head attention similarity (MimiQ's generation prior).

For every query patch, each head's pre-softmax attention logits over the keys form a map; MimiQ
min-max normalises the maps and pushes every pair of heads towards a structurally identical map with
a *global* SSIM (one window covering the whole map), loss ``mean(1 - SSIM²)`` over layers, images,
queries and head pairs (MaskAQ/hydra_image_gen_ssim_att_map.py:246-304).

The released code reshapes the key vector to a 14×14 (ViT at 224 px) or 7×7 (Swin window) map before
taking means over it; a global SSIM only uses means over all keys, so the map's shape is irrelevant
and any patch grid or window size works: the functions here take the key vector as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SSIM_C1 = 0.01**2  # SSIM constants for data in [0, 1] (L = 1)
SSIM_C2 = 0.03**2


def global_ssim(x: Tensor, y: Tensor, dim: int = -1, c1: float = SSIM_C1, c2: float = SSIM_C2) -> Tensor:
    """SSIM of x and y computed over ``dim`` as one window (population (co)variances)."""
    mx, my = x.mean(dim), y.mean(dim)
    vx = (x * x).mean(dim) - mx * mx
    vy = (y * y).mean(dim) - my * my
    cxy = (x * y).mean(dim) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def minmax_normalize(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``(x - min) / (max(x - min) + eps)`` along ``dim`` (MimiQ: eps 1e-8 on the max only)."""
    # min / max picked with gather: same values and gradients as amin / amax (barring exact ties, where
    # amax splits the gradient), but a cheaper backward (a scatter instead of an equality mask)
    lo = x.gather(dim, x.argmin(dim, keepdim=True))
    hi = x.gather(dim, x.argmax(dim, keepdim=True))
    return (x - lo) / (hi - lo + eps)


def pairwise_global_ssim(maps: Tensor, c1: float = SSIM_C1, c2: float = SSIM_C2) -> Tensor:
    """(..., H, K) maps -> (..., H, H) global SSIM of every pair of the H maps over K.

    Same values as broadcasting ``maps.unsqueeze(-2) * maps.unsqueeze(-3)`` (the released code) but
    the cross moment is one matmul, without the (..., H, H, K) tensor.
    """
    k = maps.shape[-1]
    mu = maps.mean(-1)
    var = (maps * maps).mean(-1) - mu * mu
    cross = (maps @ maps.transpose(-1, -2)) / k
    mu_ij = mu.unsqueeze(-1) * mu.unsqueeze(-2)
    cov = cross - mu_ij
    mu_sq = mu * mu
    num = (2 * mu_ij + c1) * (2 * cov + c2)
    den = (mu_sq.unsqueeze(-1) + mu_sq.unsqueeze(-2) + c1) * (var.unsqueeze(-1) + var.unsqueeze(-2) + c2)
    return num / den


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
