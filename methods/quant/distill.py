"""Teacher-student pieces for data-free fine-tuning of a fake-quantized student.

Shared by the methods that train the quantized copy of a model against its FP original
(PSAQ-ViT V2, MimiQ). Nothing here knows about images, tasks or how the inputs were made:

* discrepancies, each ``(student_out, teacher_out) -> scalar``:
  :func:`kl_logits` (KL of temperature-softened logits, teacher ‖ student) and
  :func:`feature_nmse` (per-stage MSE normalised by the teacher's variance, summed over a list of
  stage outputs, the task-independent form for backbones without class logits);
* :func:`student_parameters` / :func:`make_student_optimizer`: what to train and with what schedule;
* :func:`distillation_loss` and :func:`student_step`: one optimisation step of the student on a
  batch, the teacher run without gradients, gradients reaching the student's weights through the
  quantizers' straight-through estimator (see :mod:`methods.quant.qfunc`).

A "forward" here is any callable ``images -> outputs`` (a tensor, or a list/tuple of tensors), so a
method decides what is compared: logits, backbone stages, attention maps, or a tuple of them with a
discrepancy that combines the parts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.quant.quantizers import FakeQuantizer

Outputs = Tensor | Sequence[Tensor]
Forward = Callable[[Tensor], Outputs]
Discrepancy = Callable[[Outputs, Outputs], Tensor]  # (student outputs, teacher outputs) -> scalar

SCHEDULES = ("cosine", "constant")


# ---------------------------------------------------------------------------------------------
# Discrepancies


def kl_logits(student: Tensor, teacher: Tensor, temperature: float = 1.0, scale_t2: bool = True) -> Tensor:
    """``KL(softmax(teacher/τ) ‖ softmax(student/τ))`` averaged over the batch (rows = samples).

    Logits are (N, K) or (N, ..., K) (every leading position counts as a sample, e.g. per-pixel
    class logits). ``scale_t2`` multiplies by τ² (Hinton et al.) so gradient magnitudes do not
    shrink as τ grows; at τ = 1 it changes nothing.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"logit shapes differ: {tuple(student.shape)} (student), {tuple(teacher.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = student.shape[-1]
    log_s = F.log_softmax(student.reshape(-1, k) / temperature, dim=-1)
    log_t = F.log_softmax(teacher.reshape(-1, k) / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    return kl * temperature**2 if scale_t2 else kl


def _as_list(x: Outputs) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


def feature_nmse(
    student: Outputs, teacher: Outputs, eps: float = 1e-8, reduction: str = "sum"
) -> Tensor:
    """Σ (or mean) over stages of ``mean((s - t)²) / var(t)``: MSE normalised by the teacher variance.

    Dividing by each stage's teacher variance makes stages with large activations (deep stages,
    un-normalised outputs) weigh no more than the others, and makes the value scale-free: 1.0 is
    the error of predicting the teacher's mean. The variance is detached so that an input
    optimised to *raise* the discrepancy cannot do so by shrinking the teacher's spread.
    """
    s_list, t_list = _as_list(student), _as_list(teacher)
    if len(s_list) != len(t_list) or not s_list:
        raise ValueError(f"need the same non-zero number of stages, got {len(s_list)} and {len(t_list)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction {reduction!r} not in ('sum', 'mean')")
    terms = []
    for i, (s, t) in enumerate(zip(s_list, t_list, strict=True)):
        if s.shape != t.shape:
            raise ValueError(f"stage {i}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        var = t.detach().float().var(unbiased=False)
        terms.append((s.float() - t.float()).pow(2).mean() / (var + eps))
    total = torch.stack(terms).sum()
    return total / len(terms) if reduction == "mean" else total


# ---------------------------------------------------------------------------------------------
# What to train, and how


def student_parameters(module: nn.Module, include_quantizers: bool = False) -> list[nn.Parameter]:
    """Parameters of ``module`` to train, in module order, each once.

    By default the parameters owned by fake quantizers (e.g. LSQ step sizes) are left out: a method
    that learns them (MimiQ) passes ``include_quantizers=True`` or builds its own parameter groups.
    Min-max activation ranges are buffers and are never trained.
    """
    skip: set[int] = set()
    if not include_quantizers:
        for m in module.modules():
            if isinstance(m, FakeQuantizer):
                skip.update(id(p) for p in m.parameters())
    seen: set[int] = set()
    out = []
    for p in module.parameters():
        if id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        out.append(p)
    return out


def make_student_optimizer(
    params: Sequence[nn.Parameter] | Sequence[dict],
    lr: float,
    total_steps: int,
    *,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    schedule: str = "cosine",
    warmup_steps: int = 0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam over ``params`` and a per-step schedule (step the scheduler once per optimiser step):
    a linear warm-up ``lr·(k+1)/warmup_steps`` for the first ``warmup_steps``, then cosine from ``lr``
    to 0 at ``total_steps``, or constant.

    The warm-up matters for an already good student (e.g. W4A8): Adam's first steps move every
    parameter by about ``lr`` whatever its gradient, which can undo more than they fix.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} not in {SCHEDULES}")
    opt = torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    total = max(int(total_steps), 1)
    warm = max(int(warmup_steps), 0)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        span = max(total - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, span) / span))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------------------------------------
# Steps


def distillation_loss(
    student_fn: Forward, teacher_fn: Forward, discrepancy: Discrepancy, x: Tensor
) -> Tensor:
    """``discrepancy(student_fn(x), teacher_fn(x))`` with the teacher run under ``no_grad``: the
    teacher is a fixed target, gradients go only to the student (and to ``x`` if it requires them
    through the student)."""
    with torch.no_grad():
        t_out = teacher_fn(x)
    return discrepancy(student_fn(x), t_out)


def student_step(
    student_fn: Forward,
    teacher_fn: Forward,
    discrepancy: Discrepancy,
    x: Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = None,
) -> float:
    """One optimiser step of the student on the batch ``x`` (no labels: the teacher's outputs are the
    only target). Returns the loss before the step.

    The student is used as it is (call ``.eval()`` beforehand to keep dropout / drop-path off, as the
    fake-quant methods do); the fake quantizers pass gradients to the weights with the masked STE.
    ``x`` is detached: the images are data here, not variables.
    """
    with torch.enable_grad():
        optimizer.zero_grad(set_to_none=True)
        loss = distillation_loss(student_fn, teacher_fn, discrepancy, x.detach())
        loss.backward()
        if grad_clip is not None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return float(loss.detach())
