"""Released-code arithmetic where a method claims to follow it (issue: fidelity fixes).

The hand formulas below are written from the released code's equations: PSAQ-ViT V1 divides
(``round(x / s + zp)``), ZeroQ/MimiQ multiply by an inverse step computed from the range
(``round(k·x) / k``, ``k = (2^b-1) / (2 max|x|)``). In exact arithmetic they equal the project's default
``x·(1/s)``; in float32 they do not at a symmetric channel's extreme, which lands on the .5 tie.
"""

from __future__ import annotations

import pytest
import torch
from test_mimiq import mimiq
from tiny import make_ctx, make_target, tiny_swin, tiny_vit

from methods.baselines import V1_ACT, V1_WEIGHT
from methods.mimiq import MIMIQ_WEIGHT
from methods.quant.bits import parse_bits
from methods.quant.qat_quantizers import FirstBatchLSQQuantizer
from methods.quant.quantizers import QuantizerSpec, UniformQuantizer

BITS = 4
QMIN, QMAX = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1


def tie_weight() -> torch.Tensor:
    """Rows whose most negative entry is the row's largest magnitude: at 4 bits it maps to -7.5."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 24, generator=g)
    w[:, 0] = -(w.abs().amax(dim=1) * 1.5)  # the extreme is negative: round(-7.5) -> -8, inside the grid
    return w


def v1_scale(w: torch.Tensor) -> torch.Tensor:
    m = torch.maximum(-w.amin(dim=1), w.amax(dim=1))
    return (m / ((2**BITS - 1) / 2)).clamp(min=torch.finfo(torch.float32).eps).view(-1, 1)


def test_v1_weights_divide_as_released_and_the_tie_is_hit():
    w = tie_weight()
    s = v1_scale(w)
    released = torch.round(w / s).clamp(QMIN, QMAX) * s  # V1: x / scale + 0, round, clamp, * scale
    ours = UniformQuantizer(V1_WEIGHT, BITS)(w)
    assert torch.equal(ours, released)
    reciprocal = UniformQuantizer(QuantizerSpec(**{**V1_WEIGHT.to_dict(), "arith": "reciprocal"}), BITS)(w)
    moved = (reciprocal != released).any(dim=1)
    # the extreme lands on the tie: in a sizeable share of channels x*(1/s) puts it one step away
    assert 0.02 < moved.float().mean() < 0.5
    # exactly one step, and only at the extreme (column 0)
    torch.testing.assert_close((reciprocal - released)[moved].abs().amax(dim=1), s[moved].squeeze(1))
    assert torch.equal(reciprocal[:, 1:], released[:, 1:])


def test_mimiq_weights_use_zeroq_inverse_step():
    w = tie_weight()
    m = torch.maximum(-w.amin(dim=1), w.amax(dim=1)).view(-1, 1)
    k = (2**BITS - 1) / torch.clamp(2 * m, min=1e-8)
    released = torch.round(k * w).clamp(QMIN, QMAX) / k
    assert torch.equal(UniformQuantizer(MIMIQ_WEIGHT, BITS)(w), released)
    reciprocal = UniformQuantizer(QuantizerSpec(**{**MIMIQ_WEIGHT.to_dict(), "arith": "reciprocal"}), BITS)(w)
    assert not torch.equal(reciprocal, released)


def test_v1_activation_divides_with_zero_point():
    x = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
    q = UniformQuantizer(V1_ACT, BITS)
    q.start_calibration()
    q(x)
    q.finish_calibration()
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    s = ((hi - lo) / (2**BITS - 1)).clamp(min=torch.finfo(torch.float32).eps).reshape(1)
    zp = (-torch.round(lo / s)).clamp(0, 2**BITS - 1)
    released = (torch.round(x / s + zp).clamp(0, 2**BITS - 1) - zp) * s
    assert torch.equal(q(x), released)


def test_divide_and_zeroq_keep_the_masked_ste():
    w = tie_weight()[:8].requires_grad_(True)
    UniformQuantizer(V1_WEIGHT, BITS)(w).sum().backward()
    s = v1_scale(w.detach())
    r = torch.round(w.detach() / s)
    assert torch.equal(w.grad, ((r >= QMIN) & (r <= QMAX)).float())


def test_arith_validation():
    with pytest.raises(ValueError, match="arith"):
        QuantizerSpec(arith="nope")
    with pytest.raises(ValueError, match="zeroq"):
        QuantizerSpec(symmetric=True, per_channel=True, range="minmax", v1_scale=True, arith="zeroq")
    with pytest.raises(ValueError, match="LSQ"):
        QuantizerSpec(range="lsq", arith="divide")


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_mimiq_lsq_gradient_scale_only_on_top_level_layers(tmp_path, family):
    """Released quantize_model hands lsq_g_scale (main.py default 0.01) to the model's direct children
    only: ViT/DeiT's head; timm Swin's head is ClassifierHead.fc, nested, so every layer gets 1.0."""
    model = tiny_vit() if family == "vit" else tiny_swin()
    student = mimiq().build(make_target(model, family), parse_bits("w4a4"), make_ctx(tmp_path)).model
    scales = {p: q.g_scale for p, q in student.named_modules() if isinstance(q, FirstBatchLSQQuantizer)}
    top = {p for p in scales if p.count(".") == 1}
    assert top == ({"head.a_quant"} if family == "vit" else set())
    assert all(scales[p] == 0.01 for p in top)
    assert all(scales[p] == 1.0 for p in set(scales) - top)
    same = mimiq(lsq_g_scale_top_level=1.0).build(
        make_target(model, family), parse_bits("w4a4"), make_ctx(tmp_path)).model
    assert {q.g_scale for q in same.modules() if isinstance(q, FirstBatchLSQQuantizer)} == {1.0}
