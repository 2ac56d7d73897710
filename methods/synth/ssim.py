"""Global SSIM: one window covering the whole signal, population (co)variances.

MimiQ uses it twice: the full SSIM between pairs of attention-head maps drives its image generation
(:mod:`methods.synth.attention_ssim`), and the contrast-structure term alone (no luminance) between
teacher and student ``attn@v`` outputs is its head-wise distillation loss (:mod:`methods.losses`).
Both go through :func:`ssim_from_moments`, so the formula exists once; they differ only in how the
moments are estimated (elementwise means here, a matmul for the cross moment of all pairs).

The moment estimates and the formula keep the operation order of the two implementations this module
replaced (the released forms of MaskAQ/trainer.py and hydra_image_gen_ssim_att_map.py, the latter with
its cross moment as a matmul): values and gradients are bit-identical to them (tests/test_losses.py).
"""

from __future__ import annotations

from torch import Tensor

SSIM_C1 = 0.01**2  # SSIM constants for data in [0, 1] (L = 1)
SSIM_C2 = 0.03**2


def ssim_from_moments(
    var_x: Tensor,
    var_y: Tensor,
    cov_xy: Tensor,
    means: tuple[Tensor, Tensor, Tensor] | None = None,
    c1: float = SSIM_C1,
    c2: float = SSIM_C2,
) -> Tensor:
    """SSIM from the moments of x and y (broadcastable tensors).

    ``means`` = (μx·μy, μx², μy²) gives the full SSIM
    ``((2μxμy + C1)(2σxy + C2)) / ((μx² + μy² + C1)(σx² + σy² + C2))``; ``None`` gives only the
    contrast-structure term ``(2σxy + C2) / (σx² + σy² + C2)``.
    """
    if means is None:
        return (2 * cov_xy + c2) / (var_x + var_y + c2)
    mean_xy, mean_x_sq, mean_y_sq = means
    # numerator and denominator are each one product, divided once (not luminance x contrast-structure):
    # the released code's order, which rounds differently from the product of the two quotients
    num = (2 * mean_xy + c1) * (2 * cov_xy + c2)
    den = (mean_x_sq + mean_y_sq + c1) * (var_x + var_y + c2)
    return num / den


def global_ssim(
    x: Tensor, y: Tensor, dim: int = -1, *, luminance: bool = True, c1: float = SSIM_C1, c2: float = SSIM_C2
) -> Tensor:
    """SSIM of x and y computed over ``dim`` as one window; ``luminance=False`` returns only the
    contrast-structure term (MimiQ's distillation similarity, which ignores the means)."""
    # keepdim means, each moment formed right after its square / product: the released distillation
    # code's order (autograd accumulates gradients in the order the graph was built)
    mx, my = x.mean(dim, keepdim=True), y.mean(dim, keepdim=True)
    ex_sq = (x * x).mean(dim)
    mx_sq = (mx * mx).squeeze(dim)
    var_x = ex_sq - mx_sq
    ey_sq = (y * y).mean(dim)
    my_sq = (my * my).squeeze(dim)
    var_y = ey_sq - my_sq
    exy = (x * y).mean(dim)
    mxy = (mx * my).squeeze(dim)
    cov = exy - mxy
    return ssim_from_moments(var_x, var_y, cov, (mxy, mx_sq, my_sq) if luminance else None, c1, c2)


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
    means = (mu_ij, mu_sq.unsqueeze(-1), mu_sq.unsqueeze(-2))
    return ssim_from_moments(var.unsqueeze(-1), var.unsqueeze(-2), cov, means, c1, c2)


__all__ = ["SSIM_C1", "SSIM_C2", "global_ssim", "pairwise_global_ssim", "ssim_from_moments"]
