"""Image priors and augmentation for pixel-space synthetic-image generation.

All functions work on normalised (B, C, H, W) tensors. Randomness comes only
from the ``torch.Generator`` passed in, so generation is reproducible per seed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# PSAQ-ViT V1 reference setting of its TV target: v ~ U(2500, 3000) "for batch_size 32"
# at 3 x 224 x 224 ImageNet-normalised inputs.
V1_TV_REFERENCE = (32, 3, 224, 224)


def _diffs(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Horizontal, vertical and the two diagonal neighbour differences."""
    return (
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    )


def total_variation_l2(x: Tensor, diag_scale: float = 1.0) -> Tensor:
    """PSAQ-ViT V1 TV: sum of the Frobenius norms (over the whole batch) of the four differences.

    ``diag_scale`` multiplies the two diagonal terms (MaskAQ's copy of MimiQ uses 1/sqrt(2);
    V1 and DeepInversion use 1).
    """
    scales = (1.0, 1.0, diag_scale, diag_scale)
    return sum((w * torch.linalg.vector_norm(d) for w, d in zip(scales, _diffs(x), strict=True)),
               x.new_zeros(()))


def tv_target_loss(x: Tensor, target: float) -> Tensor:
    """V1's target-matching prior ``|TV(x) - v|``: pulls TV *towards* v rather than minimising it."""
    return (total_variation_l2(x) - target).abs()


def tv_target_scale(
    batch: int,
    in_chans: int,
    image_size: tuple[int, int],
    reference: tuple[int, int, int, int] = V1_TV_REFERENCE,
) -> float:
    """Factor that carries a TV target set at ``reference`` = (B, C, H, W) over to another input shape.

    A Frobenius norm grows with the square root of the element count at fixed per-pixel
    differences, so the factor is ``sqrt(B*C*H*W / (B0*C0*H0*W0))``: the target keeps the
    same root-mean-square neighbour difference (~0.31 in normalised units for V1).
    """
    rb, rc, rh, rw = reference
    h, w = image_size
    return math.sqrt((batch * in_chans * h * w) / (rb * rc * rh * rw))


def scale_jitter_limit(lim: int, image_size: tuple[int, int], reference_size: int = 224) -> int:
    """A jitter limit given in pixels at ``reference_size`` rescaled to the image (>= 1, < side)."""
    side = min(image_size)
    return int(max(1, min(side - 1, round(lim * side / reference_size))))


def jitter_flip(
    x: Tensor, lim: int, generator: torch.Generator, flip_p: float = 0.5
) -> tuple[Tensor, int, bool]:
    """Roll H and W by the same offset in [-lim, lim] (a diagonal jitter) and flip W with prob. flip_p.

    Returns (augmented, offset, flipped); the op is differentiable w.r.t. x.
    """
    off = int(torch.randint(-lim, lim + 1, (1,), generator=generator)) if lim > 0 else 0
    flip = bool(torch.rand((), generator=generator) < flip_p)
    out = torch.roll(x, shifts=(off, off), dims=(2, 3)) if off else x
    if flip:
        out = torch.flip(out, dims=(3,))
    return out, off, flip


@torch.no_grad()
def clamp_to_range(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """In place, clamp every channel of normalised images to its valid range (lo/hi: (1, C, 1, 1))."""
    return x.copy_(torch.maximum(torch.minimum(x, hi.to(x)), lo.to(x)))
