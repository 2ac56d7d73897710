"""Patch-similarity entropy (PSE), the attention prior of PSAQ-ViT.

PSAQ-ViT V1 (``generate_data.py`` / ``utils/kde.py`` of zkkli/PSAQ-ViT) measures
how diverse the patch tokens of each block are: average the per-head ``attn@v``
output over heads, drop the leading token(s), take the cosine similarity of every
token pair, fit a Gaussian kernel density estimate to those similarities per
image and integrate its differential entropy. Generation maximises the summed
entropy, i.e. minimises :func:`pse_loss`.

Each step is a separate function so later methods (PSAQ-ViT V2, MimiQ) can reuse
or replace one of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_BANDWIDTH = 0.01  # V1 GaussianKernel(bandwidth=0.01)
DEFAULT_GRID_POINTS = 10  # V1 linspace(..., steps=10)
DEFAULT_ENTROPY_EPS = 1e-4  # V1 differential_entropy: pdf + 1e-4 inside -p log p


def head_mean(av: Tensor, drop_tokens: int = 1) -> Tensor:
    """(B', H, N, d) per-head ``attn@v`` output -> (B', N - drop_tokens, d) head-averaged tokens.

    V1 drops token 0 (the CLS token of DeiT; for Swin the first token of every window).
    """
    if av.dim() != 4:
        raise ValueError(f"expected attn@v output of shape (B', H, N, d), got {tuple(av.shape)}")
    return av.mean(dim=1)[:, drop_tokens:, :]


def cosine_similarity_matrix(tokens: Tensor, eps: float = 1e-8) -> Tensor:
    """(B', N, D) -> (B', N, N) cosine similarity of every token pair (diagonal included).

    Same values as V1's broadcast ``cosine_similarity(a.unsqueeze(1), a.unsqueeze(2), dim=3)``
    without materialising the (B', N, N, D) tensor.
    """
    unit = F.normalize(tokens, dim=-1, eps=eps)
    return unit @ unit.transpose(-1, -2)


def kde_grid(values: Tensor, points: int = DEFAULT_GRID_POINTS) -> Tensor:
    """Evaluation grid: ``points`` evenly spaced from the global min to max of ``values``.

    As in V1 the range is global over the whole batch and detached (``.item()``), so
    no gradient flows through the grid.
    """
    lo, hi = values.min().item(), values.max().item()
    return torch.linspace(lo, hi, steps=points, device=values.device, dtype=values.dtype)


def gaussian_kde(samples: Tensor, grid: Tensor, bandwidth: float = DEFAULT_BANDWIDTH) -> Tensor:
    """Gaussian KDE per row: ``f_b(x) = mean_i N(x; samples[b, i], bandwidth^2)``.

    samples: (B, M) training points per row; grid: (G,) shared or (B, G) per row.
    Returns densities (B, G).
    """
    if grid.dim() == 1:
        grid = grid.unsqueeze(0).expand(samples.shape[0], -1)
    diffs = grid.unsqueeze(-1) - samples.unsqueeze(1)  # (B, G, M)
    var = bandwidth**2
    coef = 1.0 / math.sqrt(2.0 * math.pi * var)
    return (coef * torch.exp(-diffs.pow(2) / (2.0 * var))).mean(dim=-1)


def differential_entropy(density: Tensor, grid: Tensor, eps: float = DEFAULT_ENTROPY_EPS) -> Tensor:
    """Per-row differential entropy ``∫ -(f+eps) log(f+eps) dx`` by the trapezoid rule -> (B,)."""
    if grid.dim() == 1:
        grid = grid.unsqueeze(0).expand_as(density)
    p = density + eps
    return torch.trapezoid(-p * torch.log(p), grid, dim=-1)


def patch_similarity_entropy(
    av: Tensor,
    batch_size: int,
    drop_tokens: int = 1,
    bandwidth: float = DEFAULT_BANDWIDTH,
    grid_points: int = DEFAULT_GRID_POINTS,
) -> Tensor:
    """Mean over images of the PSE of one block's ``attn@v`` output (B', H, N, d).

    ``B' = batch_size * windows``: for Swin the windows of one image are contiguous
    (image-major, as timm's ``window_partition`` orders them), so the similarities of
    all windows of an image form that image's KDE training set (V1 ``view(B, -1)``).
    """
    sims = cosine_similarity_matrix(head_mean(av, drop_tokens))
    if sims.shape[0] % batch_size:
        raise ValueError(f"leading dim {sims.shape[0]} is not a multiple of the batch size {batch_size}")
    per_image = sims.reshape(batch_size, -1)
    grid = kde_grid(sims, grid_points)
    density = gaussian_kde(per_image, grid, bandwidth)
    return differential_entropy(density, grid).mean()


def pse_loss(
    av_outputs: Sequence[Tensor],
    batch_size: int,
    drop_tokens: int = 1,
    bandwidth: float = DEFAULT_BANDWIDTH,
    grid_points: int = DEFAULT_GRID_POINTS,
) -> Tensor:
    """``-Σ_l H_l`` over the blocks' ``attn@v`` outputs (minimising it maximises the entropy)."""
    if not av_outputs:
        raise ValueError("pse_loss needs at least one attn@v output (is the model prepared by surgery?)")
    total = av_outputs[0].new_zeros(())
    for av in av_outputs:
        total = total - patch_similarity_entropy(av, batch_size, drop_tokens, bandwidth, grid_points)
    return total
