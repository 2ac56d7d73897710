"""PSAQ-ViT-style image generation: PSE + CE to random labels + target-matching TV.

States V1's pieces of the sample-generation loop (Adam, per-stage warm-up + cosine, jitter/flip,
the PSE loss) and runs them with :func:`methods.synth.optimize.optimize_pixels`; the loss weights,
schedule and targets are parameters so PSAQ-ViT V2 can reuse the generator and add its own terms
via ``extra_loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.quant.surgery import AttentionRecorder
from methods.quant.target import InputSpec
from methods.synth.optimize import (
    OptimResult,
    Stage,
    StagedWarmupCosine,
    StepInfo,
    frozen_params,
    optimize_pixels,
)
from methods.synth.priors import jitter_flip, tv_target_loss
from methods.synth.pse import pse_loss

ExtraLoss = Callable[[Tensor, Tensor | None, list[Tensor], StepInfo], "tuple[Tensor, dict[str, float]]"]

# frozen_params lives with the loop (methods.synth.optimize); it stays importable from here, where the
# methods have always imported it from
__all__ = ["ExtraLoss", "frozen_params", "generate_pse_images"]


def generate_pse_images(
    hooked: nn.Module,
    forward: Callable[[Tensor], Tensor],
    input_spec: InputSpec,
    *,
    batch_size: int,
    stages: Sequence[Stage],
    lr: float,
    generator: torch.Generator,
    num_classes: int | None,
    ce_weight: float = 1.0,
    tv_weight: float = 0.05,
    tv_target_range: tuple[float, float] = (2500.0, 3000.0),
    tv_scale: float = 1.0,
    drop_tokens: int = 1,
    bandwidth: float = 0.01,
    grid_points: int = 10,
    betas: tuple[float, float] = (0.5, 0.9),
    eps: float = 1e-8,
    extra_loss: ExtraLoss | None = None,
    progress: Callable[[str], None] | None = None,
    init: Tensor | None = None,
) -> OptimResult:
    """Generate ``batch_size`` normalised images from N(0, 1) noise.

    ``hooked`` is the prepared module whose ``attn@v`` MatMuls are recorded; ``forward`` runs
    the FP model on images and returns logits (used for CE when ``num_classes`` is set and
    ``ce_weight > 0``; otherwise its output is ignored). Draw order from ``generator``: noise,
    labels, TV target, then the per-step augmentation. ``result.meta`` holds labels and target.
    ``init`` (normalised, ``batch_size`` images) replaces the noise start, and no noise is drawn:
    PSAQ-ViT V2 warm-starts each round from the previous round's images.
    """
    device = next(hooked.parameters()).device
    if init is None:
        init = torch.randn(input_spec.shape(batch_size), generator=generator)
    elif init.shape != input_spec.shape(batch_size):
        raise ValueError(f"init has shape {tuple(init.shape)}, expected {input_spec.shape(batch_size)}")
    init = init.to(device)
    use_ce = ce_weight > 0 and num_classes is not None
    labels = torch.randint(num_classes, (batch_size,), generator=generator).to(device) if use_ce else None
    lo, hi = tv_target_range
    tv_target = (lo + (hi - lo) * float(torch.rand((), generator=generator))) * tv_scale

    with frozen_params(hooked), AttentionRecorder(hooked, roles=("av",)) as rec:

        # V1 evaluates every term, TV included, on the jittered batch
        def loss_fn(x: Tensor, _pixels: Tensor, info: StepInfo) -> tuple[Tensor, dict[str, float]]:
            rec.clear()
            out = forward(x)
            av = list(rec.outputs["av"])
            l_pse = pse_loss(av, batch_size, drop_tokens, bandwidth, grid_points)
            l_tv = tv_target_loss(x, tv_target)
            total = l_pse + tv_weight * l_tv
            parts = {"pse": float(l_pse.detach()), "tv": float(l_tv.detach())}
            if labels is not None:
                l_ce = F.cross_entropy(out, labels)
                total = total + ce_weight * l_ce
                parts["ce"] = float(l_ce.detach())
            if extra_loss is not None:
                l_extra, extra_parts = extra_loss(x, out, av, info)
                total = total + l_extra
                parts.update(extra_parts)
            return total, parts

        result = optimize_pixels(
            init,
            loss_fn,
            stages,
            optimizer=lambda params: torch.optim.Adam(params, lr=lr, betas=betas, eps=eps),
            scheduler=lambda opt: StagedWarmupCosine(opt, stages),
            augment=lambda x, stage, _info: jitter_flip(x, stage.jitter, generator)[0],
            valid_range=input_spec.valid_range(device),
            progress=progress,
        )
    result.meta = {"labels": labels, "tv_target": tv_target}
    return result
