"""The pixel-optimisation loop shared by every image generator (PSAQ-ViT V1/V2, MimiQ).

A generator states its own pieces, the loop runs them in one fixed order. Per step:

1. ``augment(x, stage, info)`` makes the step's input from the pixels ``x`` (or ``x`` itself);
2. the gradients are zeroed and ``loss_fn(x_aug, x, info)`` is evaluated (it gets the
   un-augmented pixels too, for priors such as MimiQ's TV that act on them);
3. backward, optimiser step, then the learning-rate scheduler's step (torch's convention);
4. the pixels are clamped to the valid normalised range, and with ``stop_on_nan`` the run stops
   as soon as they hold a NaN.

The optimiser and the scheduler are built by the generator's factories over the one pixel tensor,
so their state (e.g. Adam's moments) persists over all stages. Randomness lives in the generator's
``augment`` (and whatever drew ``init``): the loop itself draws nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from methods.synth.priors import clamp_to_range


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
    lr: float  # the learning rate of this step's optimiser update


@dataclass
class OptimResult:
    images: Tensor  # detached, clamped
    history: list[dict[str, float]] = field(default_factory=list)  # per step: "loss" + named parts
    meta: dict = field(default_factory=dict)  # anything the caller wants to keep (labels, targets)
    stopped_on_nan: bool = False  # ``stop_on_nan`` ended the run: ``images`` hold NaNs


LossFn = Callable[[Tensor, Tensor, StepInfo], "Tensor | tuple[Tensor, dict[str, float]]"]
AugmentFn = Callable[[Tensor, Stage, StepInfo], Tensor]
OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], LRScheduler]


@contextlib.contextmanager
def frozen_params(module: nn.Module) -> Iterator[None]:
    """Temporarily stop gradients to the parameters (only the pixels are optimised)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def warmup_cosine_lr(base_lr: float, step: int, warmup: int, total: int) -> float:
    """V1 schedule: ``base*(step+1)/warmup`` while ``step < warmup``, then cosine to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span)) * base_lr


def rescaled_warmup(warmup: int, iterations: int, new_iterations: int) -> int:
    """The warm-up of an ``iterations``-step schedule carried to ``new_iterations`` steps (at least 1)."""
    return max(1, round(warmup * new_iterations / iterations))


class StagedWarmupCosine(LRScheduler):
    """PSAQ-ViT V1's schedule: every stage restarts :func:`warmup_cosine_lr` from its base lr
    (``stage.lr``, else the optimiser's initial lr) over its own length; the optimiser is not reset.

    Past the last stage the learning rate is left as it is (only reached by the scheduler step that
    follows the final optimiser step).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        for stage in self.stages:
            if step < stage.iterations:
                return [
                    warmup_cosine_lr(stage.lr if stage.lr is not None else base, step, stage.warmup,
                                     stage.iterations)
                    for base in self.base_lrs
                ]
            step -= stage.iterations
        return [group["lr"] for group in self.optimizer.param_groups]


def optimize_pixels(
    init: Tensor,
    loss_fn: LossFn,
    stages: Sequence[Stage],
    *,
    optimizer: OptimizerFactory,
    scheduler: SchedulerFactory | None = None,
    augment: AugmentFn | None = None,
    valid_range: tuple[Tensor, Tensor] | None = None,
    stop_on_nan: bool = False,
    progress: Callable[[str], None] | None = None,
    log_every: int = 50,
) -> OptimResult:
    """Optimise the pixels ``init`` (normalised images) to minimise ``loss_fn(augment(x), x, info)``.

    ``loss_fn`` returns the total loss, or ``(total, parts)`` with floats to log. ``optimizer`` /
    ``scheduler`` build the optimiser over ``[x]`` and its learning-rate schedule (stepped once per
    step, after the optimiser); ``valid_range`` = (lo, hi) per channel, shaped (1, C, 1, 1).
    """
    x = init.detach().clone().requires_grad_(True)
    opt = optimizer([x])
    sched = scheduler(opt) if scheduler is not None else None
    history: list[dict[str, float]] = []
    global_step = 0
    for s, stage in enumerate(stages):
        for it in range(stage.iterations):
            info = StepInfo(s, it, global_step, float(opt.param_groups[0]["lr"]))
            x_in = augment(x, stage, info) if augment is not None else x
            opt.zero_grad(set_to_none=True)
            out = loss_fn(x_in, x, info)
            loss, parts = out if isinstance(out, tuple) else (out, {})
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if valid_range is not None:
                clamp_to_range(x.data, *valid_range)
            history.append({"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}})
            if progress is not None and (global_step % log_every == 0 or it == stage.iterations - 1):
                loss_now = history[-1]["loss"]
                progress(f"stage {s + 1}/{len(stages)} it {it + 1}/{stage.iterations} loss {loss_now:.4f}")
            global_step += 1
            if stop_on_nan and torch.isnan(x).any():
                return OptimResult(x.detach(), history, stopped_on_nan=True)
    return OptimResult(x.detach(), history)
