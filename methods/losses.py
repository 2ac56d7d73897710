"""Method-specific losses: terms that belong to one method's recipe, not to the generic fake-quant core
(:mod:`methods.quant`) or the generic teacher-student pieces (:mod:`methods.quant.distill`).

MimiQ's head-wise structural attention distillation (L_HAD): for every block, head and channel of the
``attn@v`` output (B', H, N, d), the teacher's and the student's token vectors are compared with the
contrast-structure part of SSIM computed globally over the N tokens (no luminance term):
``S = (2·σ_ts + C2) / (σ_t² + σ_s² + C2)`` with population (co)variances; the loss is ``1 - mean(S)``
per block, averaged over blocks (MaskAQ/trainer.py:27-103, ``ssim_dist_loss`` / ``ssim_dist_loss_swin``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from methods.synth.ssim import SSIM_C2, global_ssim


def head_structural_distill_loss(
    teacher: Sequence[Tensor], student: Sequence[Tensor], drop_tokens: int = 0, c2: float = SSIM_C2
) -> Tensor:
    """MimiQ's L_HAD: mean over blocks of ``1 - mean_{b,h,c} S``; each entry is a block's ``attn@v``
    (B', H, N, d).

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
        sim = global_ssim(t[:, :, drop_tokens:], s[:, :, drop_tokens:], dim=2, luminance=False, c2=c2)
        losses.append(1 - sim.mean())
    return torch.stack(losses).mean()


__all__ = ["head_structural_distill_loss"]
