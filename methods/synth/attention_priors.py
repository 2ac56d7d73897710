"""SPDFQ / SARDFQ generation pieces (Zhong et al., arXiv 2412.16553): attention priors (APA),
multi-semantic regions (MSR) and soft labels (SL).

No code was released; docs/methods/spdfq.md gives the reading. Paper: a random Gaussian-mixture
prior per head and image, MSE to the model's attention on the deeper half of the blocks weighted by
depth l/L; 1..K non-overlapping regions forwarded as their own images; soft targets softmax(Z) with
Z zero except U(5, 10) at the relevant classes. Reconstructed (not in the paper): the mixture's
parameterisation (centres uniform on the token grid, isotropic sigma ~ U(1, 4) tokens, Dirichlet(1)
weights, normalised to sum 1) and the regions as distinct quadrants of the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def gmm_map(grid: tuple[int, int], centres: Tensor, sigmas: Tensor, weights: Tensor) -> Tensor:
    """The mixture density of K isotropic Gaussians on an (H, W) token grid, normalised to sum 1.

    ``centres`` (..., K, 2) in token units (row, col), ``sigmas`` (..., K), ``weights`` (..., K);
    returns (..., H*W) in row-major token order.
    """
    h, w = grid
    rows = torch.arange(h, dtype=centres.dtype, device=centres.device)
    cols = torch.arange(w, dtype=centres.dtype, device=centres.device)
    pos = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)  # (HW, 2)
    d2 = (pos[None] - centres[..., :, None, :]).pow(2).sum(-1)  # (..., K, HW)
    dens = (weights[..., None] * torch.exp(-0.5 * d2 / sigmas[..., None] ** 2)).sum(-2)
    return dens / dens.sum(-1, keepdim=True)


def random_gmm_priors(shape: Sequence[int], grid: tuple[int, int], components: int,
                      generator: torch.Generator, sigma_range: tuple[float, float] = (1.0, 4.0)) -> Tensor:
    """One random prior per leading index (e.g. (images, blocks, heads)): (*shape, H*W), each sums to 1."""
    h, w = grid
    lead = (*shape, components)
    centres = torch.rand((*lead, 2), generator=generator) * torch.tensor([h - 1, w - 1], dtype=torch.float32)
    lo, hi = sigma_range
    sigmas = lo + (hi - lo) * torch.rand(lead, generator=generator)
    weights = _dirichlet_ones(lead, generator)
    return gmm_map(grid, centres, sigmas, weights)


def _dirichlet_ones(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """Dirichlet(1, ..., 1) over the last axis from a seeded generator: normalised Exp(1) draws."""
    e = -torch.log(torch.rand(tuple(shape), generator=generator).clamp_min(1e-12))
    return e / e.sum(-1, keepdim=True)


def cls_attention(probs: Tensor, prefix_tokens: int) -> Tensor:
    """ViT/DeiT: the class token's post-softmax attention to the patch tokens, (B, heads, N_patches).

    ``probs`` (B, heads, T, T) is the first operand of a block's ``attn @ v`` (its "av" MatMul)."""
    return probs[:, :, 0, prefix_tokens:]


def window_attention_map(probs: Tensor, grid: tuple[int, int], window: int, shift: int = 0) -> Tensor:
    """Swin: each window's post-softmax attention averaged over its queries, laid back on the token
    grid (B, heads, H*W), undoing the block's cyclic shift.

    ``probs`` (B * windows, heads, window², window²) in timm's window order (row-major windows of the
    shifted map, row-major tokens inside a window).
    """
    h, w = grid
    nh, nw = h // window, w // window
    per_key = probs.mean(-2)  # (B*nW, heads, ws*ws): mean over queries
    b = per_key.shape[0] // (nh * nw)
    heads = per_key.shape[1]
    x = per_key.view(b, nh, nw, heads, window, window).permute(0, 3, 1, 4, 2, 5).reshape(b, heads, h, w)
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(2, 3))  # the shifted map back onto the image grid
    return x.reshape(b, heads, h * w)


def apa_loss(attention: Sequence[Tensor], priors: Sequence[Tensor], depths: Sequence[int],
             num_blocks: int) -> Tensor:
    """L_APA = sum over the given blocks l of (l / L) * sum over heads of MSE(A_lh, prior_lh).

    ``attention[i]`` and ``priors[i]``: (B, heads, N) for block ``depths[i]`` (1-based, of
    ``num_blocks``); the MSE is the mean over tokens, then over images.
    """
    total = attention[0].new_zeros(())
    for att, prior, depth in zip(attention, priors, depths, strict=True):
        mse = (att - prior).pow(2).mean(-1)  # (B, heads)
        total = total + (depth / num_blocks) * mse.sum(-1).mean()
    return total


def deeper_half(num_blocks: int) -> list[int]:
    """The 1-based depths APA applies to: S = L/2 .. L (paper: the deeper half)."""
    return list(range(max(1, num_blocks // 2), num_blocks + 1))


def quadrant_regions(image_size: tuple[int, int], count: int,
                     generator: torch.Generator) -> list[tuple[int, int, int, int]]:
    """``count`` (1..4) distinct quadrants of the image as (top, left, height, width): never overlapping."""
    if not 1 <= count <= 4:
        raise ValueError(f"MSR regions: count must be 1..4 quadrants, got {count}")
    h, w = image_size
    hh, hw = h // 2, w // 2
    boxes = [(0, 0, hh, hw), (0, hw, hh, w - hw), (hh, 0, h - hh, hw), (hh, hw, h - hh, w - hw)]
    order = torch.randperm(4, generator=generator)[:count].tolist()
    return [boxes[i] for i in order]


def crop_resized(x: Tensor, box: tuple[int, int, int, int], size: tuple[int, int]) -> Tensor:
    """A region of ``x`` resized (bilinear, differentiable) to the model input: its own image."""
    top, left, h, w = box
    return F.interpolate(x[..., top:top + h, left:left + w], size=size, mode="bilinear", align_corners=False)


def soft_labels(num_classes: int, classes: Sequence[Sequence[int]], generator: torch.Generator,
                low: float = 5.0, high: float = 10.0) -> Tensor:
    """Soft targets softmax(Z): per row, Z is zero except U(low, high) at that row's classes."""
    z = torch.zeros(len(classes), num_classes)
    for row, cls in enumerate(classes):
        idx = torch.as_tensor(list(cls), dtype=torch.long)
        z[row, idx] = low + (high - low) * torch.rand(len(idx), generator=generator)
    return z.softmax(-1)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """-sum_k T[k] log softmax(logits)[k], mean over the batch."""
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


__all__ = [
    "gmm_map", "random_gmm_priors", "cls_attention", "window_attention_map", "apa_loss", "deeper_half",
    "quadrant_regions", "crop_resized", "soft_labels", "soft_cross_entropy",
]
