"""SSIM (methods/synth/ssim.py) and MimiQ's head-wise distillation loss (methods/losses.py), against
hand values and the released formulas written out here."""

from __future__ import annotations

import pytest
import torch

from methods.losses import head_structural_distill_loss
from methods.synth.ssim import global_ssim, pairwise_global_ssim

torch.set_num_threads(1)
C1, C2 = 0.01**2, 0.03**2


# The formulas as released / as they stood before SSIM had one implementation, op for op.


def released_pairwise_ssim(maps: torch.Tensor) -> torch.Tensor:
    k = maps.shape[-1]
    mu = maps.mean(-1)
    var = (maps * maps).mean(-1) - mu * mu
    cross = (maps @ maps.transpose(-1, -2)) / k
    mu_ij = mu.unsqueeze(-1) * mu.unsqueeze(-2)
    cov = cross - mu_ij
    mu_sq = mu * mu
    num = (2 * mu_ij + C1) * (2 * cov + C2)
    den = (mu_sq.unsqueeze(-1) + mu_sq.unsqueeze(-2) + C1) * (var.unsqueeze(-1) + var.unsqueeze(-2) + C2)
    return num / den


def released_contrast_structure(t: torch.Tensor, s: torch.Tensor, dim: int) -> torch.Tensor:
    mt, ms = t.mean(dim, keepdim=True), s.mean(dim, keepdim=True)
    vt = (t * t).mean(dim) - (mt * mt).squeeze(dim)
    vs = (s * s).mean(dim) - (ms * ms).squeeze(dim)
    cts = (t * s).mean(dim) - (mt * ms).squeeze(dim)
    return (2 * cts + C2) / (vt + vs + C2)


def direct_global_ssim(x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    mx, my = x.mean(dim), y.mean(dim)
    vx = (x * x).mean(dim) - mx * mx
    vy = (y * y).mean(dim) - my * my
    cxy = (x * y).mean(dim) - mx * my
    return ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx * mx + my * my + C1) * (vx + vy + C2))


def _value_and_grads(fn, *inputs: torch.Tensor, weight: torch.Tensor):
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    (out * weight).sum().backward()
    return [out.detach(), *(x.grad for x in leaves)]


def test_global_ssim_matches_hand_computation():
    x = torch.tensor([0.0, 0.5, 1.0, 0.25])
    y = torch.tensor([0.1, 0.4, 0.9, 0.5])
    mx, my = 0.4375, 0.475
    vx = (0.0 + 0.25 + 1.0 + 0.0625) / 4 - mx**2
    vy = (0.01 + 0.16 + 0.81 + 0.25) / 4 - my**2
    cxy = (0.0 + 0.2 + 0.9 + 0.125) / 4 - mx * my
    want = (2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
    assert float(global_ssim(x, y)) == pytest.approx(want, rel=1e-5)
    assert float(global_ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    cs = (2 * cxy + C2) / (vx + vy + C2)
    assert float(global_ssim(x, y, luminance=False)) == pytest.approx(cs, rel=1e-5)


def test_contrast_structure_hand_value_ignores_luminance():
    t = torch.tensor([1.0, 2.0, 3.0, 4.0])
    s = torch.tensor([2.0, 1.0, 4.0, 3.0])
    vt = vs = 1.25
    cts = (2 + 2 + 12 + 12) / 4 - 2.5 * 2.5
    want = (2 * cts + C2) / (vt + vs + C2)
    assert float(global_ssim(t, s, luminance=False)) == pytest.approx(want, rel=1e-6)
    # a constant shift of one signal changes only the luminance term
    assert float(global_ssim(t, t + 3.0, luminance=False)) == pytest.approx(1.0, abs=1e-6)
    assert float(global_ssim(t, t + 3.0)) < 0.99


@pytest.mark.parametrize("seed", range(4))
def test_ssim_is_bit_identical_to_the_released_formulas(seed):
    g = torch.Generator().manual_seed(seed)
    # generation: all head pairs of min-max-like maps in [0, 1], (B', N, H, K)
    maps = torch.rand(3, 5, 4, 16, generator=g)
    w = torch.randn(3, 5, 4, 4, generator=g)
    ours = _value_and_grads(pairwise_global_ssim, maps, weight=w)
    ref = _value_and_grads(released_pairwise_ssim, maps, weight=w)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    # distillation: contrast-structure over the token axis of (B', H, N, d), gradients to both sides
    t, s = torch.randn(2, 3, 9, 5, generator=g), torch.randn(2, 3, 9, 5, generator=g)
    w = torch.randn(2, 3, 5, generator=g)
    ours = _value_and_grads(lambda a, b: global_ssim(a, b, 2, luminance=False), t, s, weight=w)
    ref = _value_and_grads(lambda a, b: released_contrast_structure(a, b, 2), t, s, weight=w)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    # the full elementwise SSIM: the direct formula
    assert torch.equal(global_ssim(t, s, 2), direct_global_ssim(t, s, 2))


def test_head_structural_distill_loss():
    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(2, 3, 9, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)]
    assert float(head_structural_distill_loss(teacher, [t.clone() for t in teacher], 1)) == pytest.approx(
        0.0, abs=1e-6)
    student = [x + 0.5 * torch.randn(x.shape, generator=g) for x in teacher]
    manual = torch.stack([1 - released_contrast_structure(a[:, :, 1:], b[:, :, 1:], dim=2).mean()
                          for a, b in zip(teacher, student, strict=True)]).mean()
    assert torch.equal(head_structural_distill_loss(teacher, student, 1), manual)
    assert float(manual) > 0.05
    with pytest.raises(ValueError, match="matching non-empty"):
        head_structural_distill_loss(teacher, student[:1])
    with pytest.raises(ValueError, match="equal"):
        head_structural_distill_loss(teacher[:1], [teacher[0][:, :, :5]])
