"""A generic pixel-optimisation loop: Adam on an image batch over stages.

Each stage restarts a warm-up + cosine learning-rate schedule and may use its
own jitter limit; the Adam state persists across stages (as in PSAQ-ViT V1).
After every step the pixels are clamped to the valid normalised range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from methods.synth.priors import clamp_to_range, jitter_flip


@dataclass(frozen=True)
class Stage:
    """One stage: ``iterations`` steps, jitter limit in pixels, warm-up length, optional lr override."""

    iterations: int
    jitter: int = 0
    warmup: int = 0
    lr: float | None = None


@dataclass(frozen=True)
class StepInfo:
    stage: int
    step: int  # within the stage
    global_step: int
    lr: float


@dataclass
class OptimResult:
    images: Tensor  # detached, clamped
    history: list[dict[str, float]] = field(default_factory=list)  # per step: "loss" + named parts
    meta: dict = field(default_factory=dict)  # anything the caller wants to keep (labels, targets)


LossFn = Callable[[Tensor, StepInfo], "Tensor | tuple[Tensor, dict[str, float]]"]
AugmentFn = Callable[[Tensor, Stage, torch.Generator], Tensor]


def warmup_cosine_lr(base_lr: float, step: int, warmup: int, total: int) -> float:
    """V1 schedule: ``base*(step+1)/warmup`` while ``step < warmup``, then cosine to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span)) * base_lr


def default_augment(x: Tensor, stage: Stage, generator: torch.Generator) -> Tensor:
    """Random diagonal roll by up to ``stage.jitter`` pixels plus a horizontal flip with p = 0.5."""
    return jitter_flip(x, stage.jitter, generator)[0]


def optimize_pixels(
    init: Tensor,
    loss_fn: LossFn,
    stages: Sequence[Stage],
    *,
    lr: float,
    generator: torch.Generator,
    betas: tuple[float, float] = (0.5, 0.9),
    eps: float = 1e-8,
    augment: AugmentFn | None = default_augment,
    valid_range: tuple[Tensor, Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
    log_every: int = 50,
) -> OptimResult:
    """Optimise the pixels ``init`` (normalised images) to minimise ``loss_fn(augment(x), info)``.

    ``loss_fn`` returns the total loss, or ``(total, parts)`` with floats to log. ``generator``
    drives the augmentation; ``valid_range`` = (lo, hi) per channel, shaped (1, C, 1, 1).
    """
    x = init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr, betas=betas, eps=eps)  # one optimiser: state persists
    history: list[dict[str, float]] = []
    global_step = 0
    for s, stage in enumerate(stages):
        base = stage.lr if stage.lr is not None else lr
        for it in range(stage.iterations):
            cur = warmup_cosine_lr(base, it, stage.warmup, stage.iterations)
            for group in opt.param_groups:
                group["lr"] = cur
            info = StepInfo(s, it, global_step, cur)
            x_in = augment(x, stage, generator) if augment is not None else x
            opt.zero_grad(set_to_none=True)
            out = loss_fn(x_in, info)
            loss, parts = out if isinstance(out, tuple) else (out, {})
            loss.backward()
            opt.step()
            if valid_range is not None:
                clamp_to_range(x.data, *valid_range)
            history.append({"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}})
            if progress is not None and (global_step % log_every == 0 or it == stage.iterations - 1):
                loss_now = history[-1]["loss"]
                progress(f"stage {s + 1}/{len(stages)} it {it + 1}/{stage.iterations} loss {loss_now:.4f}")
            global_step += 1
    return OptimResult(x.detach(), history)
