"""MimiQ-style image generation: inter-head attention similarity + CE to random labels + TV.

Follows MaskAQ/hydra_image_gen_ssim_att_map.py ``generate`` (L308-447) without MaskAQ's additions:
per batch, images start from N(0, 1) in normalised space and are optimised by AdamW with a cosine
schedule; each step rolls the batch by independent random offsets in H and W (limit J₁ for the first
half of the steps, J₂ after), adds a per-sample per-channel constant offset that decays over the
steps and applies a per-sample per-channel affine colour shift (image_gen_aug_utils.py), records the
pre-softmax ``q@kᵀ`` of every block, and minimises ``w_ih·L_IH + w_ce·CE + w_tv·TV(x)`` with TV on
the un-augmented images. After each step the pixels are clamped to the valid range; a batch that
turns NaN is discarded (as the released code does). The loop is
:func:`methods.synth.optimize.optimize_pixels`, one run per batch.

All randomness comes from the ``torch.Generator`` passed in (reproducible per seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.quant.surgery import AttentionRecorder
from methods.quant.target import InputSpec
from methods.synth.attention_ssim import inter_head_similarity_loss
from methods.synth.optimize import LossFn, Stage, StepInfo, frozen_params, optimize_pixels
from methods.synth.priors import total_variation_l2

# MimiQ's reference setting: B = 16 images of 3 x 224 x 224 (the TV weight 2.5e-5 was set for it).
MIMIQ_TV_REFERENCE = (16, 3, 224, 224)


def roll_jitter(x: Tensor, lim: int, generator: torch.Generator) -> Tensor:
    """Roll H and W by independent offsets in [-lim, lim]."""
    if lim <= 0:
        return x
    off = torch.randint(-lim, lim + 1, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=(off[0], off[1]), dims=(2, 3))


def offset_noise_remaining(step: int, iterations: int) -> int:
    """The released GaussianNoise's decaying factor at a step: it is shuffled once in its constructor
    and then once per call, so step t uses ``(iters - 2 - t) mod iters`` (the last step wraps to the
    largest value, iters - 1)."""
    return (iterations - 2 - step) % iterations


def offset_noise(x: Tensor, step: int, iterations: int, std: float, generator: torch.Generator) -> Tensor:
    """Add a per-sample, per-channel constant ``N(0, 1)·std·r/iters`` (r from offset_noise_remaining)."""
    eps = torch.randn(x.shape[0], x.shape[1], 1, 1, generator=generator).to(x)
    return x + eps * (offset_noise_remaining(step, iterations) * std / iterations)


def color_shift(x: Tensor, generator: torch.Generator, mean: float = 1.0, std: float = 1.0) -> Tensor:
    """``(x - m) / s`` per sample and channel with ``m ~ U(-mean, mean)``, ``s = exp(U(-std, std))``."""
    b, c = x.shape[:2]
    m = (torch.rand(b, c, 1, 1, generator=generator) - 0.5) * 2 * mean
    s = ((torch.rand(b, c, 1, 1, generator=generator) - 0.5) * 2 * std).exp()
    return (x - m.to(x)) / s.to(x)


@dataclass
class GenerationResult:
    images: Tensor  # (N, C, H, W) normalised, detached, on CPU
    labels: Tensor | None  # (N,) random target classes, None without CE
    history: list[dict[str, float]] = field(default_factory=list)  # per batch: first / last losses
    discarded: int = 0  # batches dropped because they turned NaN


def generate_interhead_images(
    hooked: nn.Module,
    forward: Callable[[Tensor], Tensor],
    input_spec: InputSpec,
    *,
    num_images: int,
    batch_size: int,
    iterations: int,
    generator: torch.Generator,
    num_classes: int | None,
    drop_tokens: int = 0,
    jitter: tuple[int, int] = (8, 16),
    lr: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-6,
    eta_min: float = 1e-3,
    ih_weight: float = 1.0,
    ce_weight: float = 1.0,
    tv_weight: float = 2.5e-5,
    tv_diag_scale: float = 1.0,
    noise_std: float = 0.5,
    color_mean: float = 1.0,
    color_std: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate ``num_images`` images, ``batch_size`` at a time (the last batch may be smaller).

    ``hooked``: the prepared module whose "qk" MatMuls are recorded; ``forward(x)`` runs the FP model
    (its output is the logits when ``num_classes`` is set, else ignored). ``jitter`` = (J₁, J₂) in
    pixels of this input. Per batch the generator draws: init noise, labels, then per step the two
    roll offsets, the offset noise and the colour shift.
    """
    device = next(hooked.parameters()).device
    valid_range = input_spec.valid_range(device)
    use_ce = ce_weight > 0 and num_classes is not None
    # filled in place: at the paper setting (10k x 3 x 224 x 224) a list + cat would need twice the memory
    images = torch.empty(num_images, input_spec.in_chans, *input_spec.image_size)
    labels = torch.empty(num_images, dtype=torch.long) if use_ce else None
    kept, history, discarded = 0, [], 0

    # MimiQ's pieces of the shared loop (one run per batch): AdamW, cosine to eta_min, and per step
    # roll jitter (J1 for the first half) + decaying offset noise + colour shift
    def adamw(params: list[Tensor]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def cosine(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations, eta_min=eta_min)

    def augment(x: Tensor, _stage: Stage, info: StepInfo) -> Tensor:
        t = info.step
        lim = jitter[0] if t < iterations / 2 else jitter[1]
        x_aug = roll_jitter(x, lim, generator)
        return color_shift(offset_noise(x_aug, t, iterations, noise_std, generator), generator,
                           color_mean, color_std)

    with frozen_params(hooked), AttentionRecorder(hooked, roles=("qk",)) as rec:

        def make_loss(y: Tensor | None) -> LossFn:
            def loss_fn(x_aug: Tensor, x: Tensor, _info: StepInfo) -> tuple[Tensor, dict[str, float]]:
                rec.clear()
                out = forward(x_aug)
                logits = [o for o in rec.outputs["qk"] if o is not None]
                l_ih = inter_head_similarity_loss(logits, drop_tokens)
                l_tv = total_variation_l2(x, tv_diag_scale)  # on the un-augmented pixels
                loss = ih_weight * l_ih + tv_weight * l_tv
                parts = {"ih": float(l_ih.detach()), "tv": float(l_tv.detach())}
                if y is not None:
                    l_ce = F.cross_entropy(out, y)
                    loss = loss + ce_weight * l_ce
                    parts["ce"] = float(l_ce.detach())
                return loss, parts

            return loss_fn

        n_batches = math.ceil(num_images / batch_size)
        for b in range(n_batches):
            bs = min(batch_size, num_images - b * batch_size)
            x0 = torch.randn(input_spec.shape(bs), generator=generator).to(device)
            y = torch.randint(num_classes, (bs,), generator=generator).to(device) if use_ce else None
            res = optimize_pixels(x0, make_loss(y), [Stage(iterations)], optimizer=adamw, scheduler=cosine,
                                  augment=augment, valid_range=valid_range, stop_on_nan=True)
            rec.clear()
            if res.stopped_on_nan:
                discarded += 1
                if progress is not None:
                    progress(f"batch {b + 1}/{n_batches}: NaN, discarded")
                continue
            first, last = res.history[0], res.history[-1]
            history.append({**{f"first_{k}": v for k, v in first.items()},
                            **{f"last_{k}": v for k, v in last.items()}})
            images[kept:kept + bs] = res.images.cpu()
            if labels is not None:
                labels[kept:kept + bs] = y.cpu()
            kept += bs
            if progress is not None:
                progress(f"batch {b + 1}/{n_batches} loss {first['loss']:.4f} -> {last['loss']:.4f}")
    if kept == 0:
        raise RuntimeError("every generated batch turned NaN")
    return GenerationResult(images[:kept], labels[:kept] if labels is not None else None, history, discarded)
