"""Unit tests of methods/synth: PSE (KDE entropy), priors, augmentation, schedules, the pixel loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde as scipy_kde

from methods.synth.optimize import Stage, StagedWarmupCosine, StepInfo, optimize_pixels, warmup_cosine_lr
from methods.synth.priors import (
    clamp_to_range,
    jitter_flip,
    scale_jitter_limit,
    total_variation_l2,
    tv_target_loss,
    tv_target_scale,
)
from methods.synth.pse import (
    cosine_similarity_matrix,
    differential_entropy,
    gaussian_kde,
    head_mean,
    kde_grid,
    patch_similarity_entropy,
    pse_loss,
)

torch.set_num_threads(1)


def _entropy_by_loop(values: np.ndarray, grid: np.ndarray, h: float = 0.01, eps: float = 1e-4) -> float:
    """Reference: density by an explicit loop over grid and samples, trapezoid by hand."""
    dens = []
    for x in grid:
        s = sum(math.exp(-((x - v) ** 2) / (2 * h * h)) / math.sqrt(2 * math.pi * h * h) for v in values)
        dens.append(s / len(values))
    f = [-(d + eps) * math.log(d + eps) for d in dens]
    return sum((grid[i + 1] - grid[i]) * (f[i] + f[i + 1]) / 2 for i in range(len(grid) - 1))


def test_gaussian_kde_matches_scipy_and_loop():
    vals = np.array([0.10, 0.50, 0.52, 0.90, 0.905], dtype=np.float64)
    samples = torch.tensor(vals).unsqueeze(0)
    grid = torch.linspace(vals.min(), vals.max(), 10, dtype=torch.float64)
    ours = gaussian_kde(samples, grid, bandwidth=0.01)[0].numpy()
    ref = scipy_kde(vals, bw_method=0.01 / vals.std(ddof=1))(grid.numpy())
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    h = differential_entropy(gaussian_kde(samples, grid, 0.01), grid)[0].item()
    assert h == pytest.approx(_entropy_by_loop(vals, grid.numpy()), rel=1e-10)


def test_cosine_similarity_matrix_hand_made():
    t = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]]])
    s = cosine_similarity_matrix(t)[0]
    r = 1 / math.sqrt(2)
    expected = torch.tensor(
        [[1.0, 0.0, r, -1.0], [0.0, 1.0, r, 0.0], [r, r, 1.0, -r], [-1.0, 0.0, -r, 1.0]]
    )
    torch.testing.assert_close(s, expected)
    ref = torch.cosine_similarity(t.unsqueeze(1), t.unsqueeze(2), dim=3)
    torch.testing.assert_close(s, ref[0])


def test_head_mean_drops_first_token():
    av = torch.arange(2 * 2 * 3 * 1, dtype=torch.float32).view(2, 2, 3, 1)  # (B', H, N, d)
    out = head_mean(av, drop_tokens=1)
    assert out.shape == (2, 2, 1)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([(1 + 4) / 2, (2 + 5) / 2]))


def test_patch_similarity_entropy_matches_direct_computation_with_windows():
    g = torch.Generator().manual_seed(0)
    batch, windows = 2, 3
    av = torch.randn(batch * windows, 2, 5, 4, generator=g, dtype=torch.float64)  # (B', H, N, d)
    ours = patch_similarity_entropy(av, batch)
    # direct: per image, all windows' similarities (token 0 of each window dropped) as one sample set
    tok = av.mean(1)[:, 1:, :].numpy()
    unit = tok / np.linalg.norm(tok, axis=2, keepdims=True)
    sims = np.einsum("bnd,bmd->bnm", unit, unit)
    grid = np.linspace(sims.min(), sims.max(), 10)
    ent = [_entropy_by_loop(sims[b * windows:(b + 1) * windows].ravel(), grid) for b in range(batch)]
    assert ours.item() == pytest.approx(float(np.mean(ent)), rel=1e-9)
    loss = pse_loss([av, av], batch)
    assert loss.item() == pytest.approx(-2 * ours.item(), rel=1e-12)


def test_kde_grid_is_global_and_detached():
    x = torch.tensor([[0.2, 0.4], [-0.1, 0.9]], requires_grad=True)
    grid = kde_grid(x, 4)
    assert not grid.requires_grad
    torch.testing.assert_close(grid, torch.tensor([-0.1, 0.1 + 0.4 / 3, 0.5 + 0.2 / 3, 0.9]))


def test_pse_gradient_flows_to_tokens():
    av = torch.randn(2, 2, 6, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    pse_loss([av], 2).backward()
    assert av.grad is not None and av.grad.abs().sum() > 0


def test_total_variation_hand_made():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])  # (1,1,2,2)
    # horizontal diffs: -1, -2 ; vertical: -2, -3 ; diag (1,0)-(0,1): 2-1=1 ; diag (0,0)-(1,1): -4
    expected = math.sqrt(1 + 4) + math.sqrt(4 + 9) + 1.0 + 4.0
    assert total_variation_l2(x).item() == pytest.approx(expected)
    assert tv_target_loss(x, 10.0).item() == pytest.approx(abs(expected - 10.0))


def test_tv_target_scale():
    assert tv_target_scale(32, 3, (224, 224)) == pytest.approx(1.0)
    assert tv_target_scale(8, 3, (224, 224)) == pytest.approx(0.5)  # sqrt(B/32)
    assert tv_target_scale(32, 1, (28, 28)) == pytest.approx(math.sqrt(28 * 28 / (3 * 224 * 224)))


def test_jitter_flip_deterministic_and_clamp():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    a, off_a, flip_a = jitter_flip(x, 2, torch.Generator().manual_seed(3))
    b, off_b, flip_b = jitter_flip(x, 2, torch.Generator().manual_seed(3))
    assert (off_a, flip_a) == (off_b, flip_b) and torch.equal(a, b)
    assert -2 <= off_a <= 2
    ref = torch.roll(x, (off_a, off_a), (2, 3))
    torch.testing.assert_close(a, torch.flip(ref, (3,)) if flip_a else ref)
    y = torch.tensor([[[[-5.0, 0.5]], [[9.0, -0.2]]]])
    clamp_to_range(y, torch.tensor([-1.0, 0.0]).view(1, 2, 1, 1), torch.tensor([1.0, 2.0]).view(1, 2, 1, 1))
    torch.testing.assert_close(y, torch.tensor([[[[-1.0, 0.5]], [[2.0, 0.0]]]]))
    assert scale_jitter_limit(15, (224, 224)) == 15
    assert scale_jitter_limit(15, (28, 28)) == 2 and scale_jitter_limit(30, (28, 28)) == 4
    assert scale_jitter_limit(30, (4, 4)) == 1


def test_warmup_cosine_schedule():
    lr = 0.2
    assert warmup_cosine_lr(lr, 0, 100, 500) == pytest.approx(0.002)
    assert warmup_cosine_lr(lr, 49, 100, 500) == pytest.approx(0.1)
    assert warmup_cosine_lr(lr, 99, 100, 500) == pytest.approx(0.2)
    assert warmup_cosine_lr(lr, 100, 100, 500) == pytest.approx(0.2)
    assert warmup_cosine_lr(lr, 300, 100, 500) == pytest.approx(0.1)  # half-way through the cosine
    assert warmup_cosine_lr(lr, 500, 100, 500) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine_lr(lr, 3, 0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)) * lr)


def test_staged_warmup_cosine_restarts_per_stage():
    stages = [Stage(5, warmup=2), Stage(4, warmup=1, lr=0.3)]
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.2)
    sched = StagedWarmupCosine(opt, stages)
    seen = []
    for _ in range(9):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [warmup_cosine_lr(0.2, t, 2, 5) for t in range(5)]
    want += [warmup_cosine_lr(0.3, t, 1, 4) for t in range(4)]
    assert seen == want  # the same floats, not just close
    assert seen[:3] == [0.1, 0.2, 0.2] and seen[5] == pytest.approx(0.3)
    assert opt.param_groups[0]["lr"] == seen[-1]  # past the last stage: left as it was


def _pse_style_run(target, lo, hi, stages, use_loop: bool):
    """Adam + V1 schedule + jitter/flip + clamp, either through optimize_pixels or written out."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(2, 1, 6, 6, generator=g)

    def loss(x_aug, x):  # one term on the augmented input, one on the pixels themselves
        return ((x_aug - target) ** 2).mean() + 0.01 * total_variation_l2(x)

    if use_loop:
        infos = []

        def loss_fn(x_aug, x, info):
            infos.append(info)
            return loss(x_aug, x), {"tv": total_variation_l2(x).detach()}

        res = optimize_pixels(
            x0, loss_fn, stages,
            optimizer=lambda p: torch.optim.Adam(p, lr=0.1, betas=(0.5, 0.9)),
            scheduler=lambda opt: StagedWarmupCosine(opt, stages),
            augment=lambda x, stage, _info: jitter_flip(x, stage.jitter, g)[0],
            valid_range=(lo, hi),
        )
        return res.images, [h["loss"] for h in res.history], infos
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1, betas=(0.5, 0.9))
    losses, infos, k = [], [], 0
    for s, stage in enumerate(stages):
        for it in range(stage.iterations):
            lr = warmup_cosine_lr(0.1, it, stage.warmup, stage.iterations)
            opt.param_groups[0]["lr"] = lr
            infos.append(StepInfo(s, it, k, lr))
            x_aug = jitter_flip(x, stage.jitter, g)[0]
            opt.zero_grad()
            value = loss(x_aug, x)
            value.backward()
            opt.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
            losses.append(float(value.detach()))
            k += 1
    return x.detach(), losses, infos


def test_optimize_pixels_equals_the_loop_written_out():
    target = torch.linspace(-1, 1, 2 * 1 * 6 * 6).view(2, 1, 6, 6)
    lo, hi = torch.full((1, 1, 1, 1), -0.8), torch.full((1, 1, 1, 1), 0.8)
    stages = [Stage(12, jitter=1, warmup=3), Stage(8, jitter=2, warmup=2)]
    images, losses, infos = _pse_style_run(target, lo, hi, stages, use_loop=True)
    ref_images, ref_losses, ref_infos = _pse_style_run(target, lo, hi, stages, use_loop=False)
    assert torch.equal(images, ref_images)
    assert losses == ref_losses and infos == ref_infos
    assert losses[-1] < 0.5 * losses[0]
    assert images.min() >= -0.8 and images.max() <= 0.8


def test_optimize_pixels_plain_sgd_by_hand_and_stop_on_nan():
    # SGD on 0.5·||x||² without schedule or augmentation: x_k = (1 - lr)^k · x_0
    x0 = torch.tensor([[[[2.0, -4.0]]]])

    def half_square(x_aug, x, info):
        return 0.5 * (x_aug**2).sum()

    res = optimize_pixels(x0, half_square, [Stage(3)], optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    assert torch.equal(res.images, x0 * 0.125)
    assert [h["loss"] for h in res.history] == [10.0, 2.5, 0.625]
    assert not res.stopped_on_nan and torch.equal(x0, torch.tensor([[[[2.0, -4.0]]]]))  # init untouched

    def nan_at_step_1(x_aug, x, info):
        return half_square(x_aug, x, info) * (math.nan if info.global_step == 1 else 1.0)

    stopped = optimize_pixels(x0, nan_at_step_1, [Stage(2), Stage(3)],
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.5), stop_on_nan=True)
    assert stopped.stopped_on_nan and len(stopped.history) == 2 and torch.isnan(stopped.images).all()
    ran_on = optimize_pixels(x0, nan_at_step_1, [Stage(2), Stage(3)],
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    assert not ran_on.stopped_on_nan and len(ran_on.history) == 5
