"""Head-wise structural attention distillation (MimiQ's L_HAD).

For every block, head and channel of the ``attn@v`` output (B', H, N, d), the teacher's and the
student's token vectors are compared with the contrast-structure part of SSIM computed globally over
the N tokens (no luminance term): ``S = (2·σ_ts + C2) / (σ_t² + σ_s² + C2)`` with population
(co)variances; the loss is ``1 - mean(S)`` per block, averaged over blocks
(MaskAQ/trainer.py:27-103, ``ssim_dist_loss`` / ``ssim_dist_loss_swin``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SSIM_C2 = 0.03**2


def contrast_structure(t: Tensor, s: Tensor, dim: int = -1, c2: float = SSIM_C2) -> Tensor:
    """SSIM's contrast-structure term of t and s over ``dim`` (one global window)."""
    mt, ms = t.mean(dim, keepdim=True), s.mean(dim, keepdim=True)
    vt = (t * t).mean(dim) - (mt * mt).squeeze(dim)
    vs = (s * s).mean(dim) - (ms * ms).squeeze(dim)
    cts = (t * s).mean(dim) - (mt * ms).squeeze(dim)
    return (2 * cts + c2) / (vt + vs + c2)


def head_structural_distill_loss(
    teacher: Sequence[Tensor], student: Sequence[Tensor], drop_tokens: int = 0, c2: float = SSIM_C2
) -> Tensor:
    """Mean over blocks of ``1 - mean_{b,h,c} S``; each entry is a block's ``attn@v`` (B', H, N, d).

    ``drop_tokens`` leading tokens (CLS / distillation token) are left out of the token axis. The
    released ViT code stacks the blocks and takes one mean; with equally sized blocks that equals the
    mean over blocks used here (and by its Swin variant, whose window counts differ per stage).
    """
    if len(teacher) != len(student) or not teacher:
        raise ValueError(f"need matching non-empty block lists, got {len(teacher)} and {len(student)}")
    losses = []
    for t, s in zip(teacher, student, strict=True):
        if t.shape != s.shape or t.dim() != 4:
            raise ValueError(f"attn@v outputs must be equal (B', H, N, d) tensors: {t.shape} vs {s.shape}")
        sim = contrast_structure(t[:, :, drop_tokens:], s[:, :, drop_tokens:], dim=2, c2=c2)
        losses.append(1 - sim.mean())
    return torch.stack(losses).mean()
