"""Two-scale quantizers (twin_gelu, twin_softmax, outlier_2sf): outputs against hand-computed values,
STE masks, defaults from calibration, set_bits, state keys. Inputs avoid rounding ties (x/step = k+0.5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from methods.quant.modules import MatMul, QuantLinear, QuantMatMul, QuantTap, Tap
from methods.quant.policy import calibrate
from methods.quant.quantizers import (
    Outlier2SFQuantizer,
    QuantizerSpec,
    TwinGeluQuantizer,
    TwinSoftmaxQuantizer,
    make_quantizer,
)
from methods.quant.twin_quantizers import GELU_NEG_RANGE

GELU = QuantizerSpec(kind="twin_gelu")
SOFTMAX = QuantizerSpec(kind="twin_softmax")
O2SF = QuantizerSpec(kind="outlier_2sf")


def close(a: torch.Tensor, b, atol: float = 1e-6) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


def test_make_quantizer_and_spec_validation():
    assert isinstance(make_quantizer(GELU, 4), TwinGeluQuantizer)
    assert isinstance(make_quantizer(SOFTMAX, 4), TwinSoftmaxQuantizer)
    assert isinstance(make_quantizer(O2SF, 4), Outlier2SFQuantizer)
    for bad in (dict(symmetric=True), dict(per_channel=True), dict(range="mse"), dict(range="lsq")):
        with pytest.raises(ValueError):
            QuantizerSpec(kind="twin_gelu", **bad)
    with pytest.raises(ValueError):
        QuantizerSpec(kind="outlier_2sf", outlier_max_shift=0)
    assert QuantizerSpec.from_dict(O2SF.to_dict()) == O2SF


# ---- twin_gelu ---------------------------------------------------------------------------------
XG = torch.tensor([-0.2, -0.075, -0.013, 0.0, 0.1, 0.3, 0.8, 2.9, 5.0])


def test_twin_gelu_values():
    # b=4: positive codes 0..7 at Δpos=0.5, negative codes -8..0 at Δneg=0.02
    q = make_quantizer(GELU, 4)
    q.set_params(0.5, neg=0.02)
    assert close(q(XG), [-0.16, -0.08, -0.02, 0.0, 0.0, 0.5, 1.0, 3.0, 3.5])
    q.set_params(0.5, k=3)  # OPT-m: Δneg = 0.5 / 8 = 0.0625
    assert q.k == 3 and close(q.neg_scale, [0.0625])
    # negatives: -3.2 -> -3 (-0.1875), -1.2 -> -1 (-0.0625), -0.208 -> 0
    assert close(q(XG), [-0.1875, -0.0625, 0.0, 0.0, 0.0, 0.5, 1.0, 3.0, 3.5])


def test_twin_gelu_default_from_calibration_and_set_bits():
    q = make_quantizer(GELU, 4)
    q.start_calibration()
    assert torch.equal(q(XG), XG)
    q.finish_calibration()
    assert close(q.scale, [5.0 / 7.5]) and close(q.neg_scale, [GELU_NEG_RANGE / 8]) and q.k is None
    q.set_bits(8)  # not searched: recomputed from the statistics
    assert close(q.scale, [5.0 / 127.5]) and close(q.neg_scale, [GELU_NEG_RANGE / 128])
    q.set_bits(4)
    q.set_params(0.5, k=3)
    q.set_bits(8)  # searched: the multiple of max/(2^(b-1)-0.5) and k are kept
    assert close(q.scale, [0.5 * 7.5 / 127.5]) and q.k == 3 and close(q.neg_scale, q.scale / 8)


def test_twin_gelu_ste_mask():
    q = make_quantizer(GELU, 4)
    q.set_params(0.5, neg=0.02)
    x = XG.clone().requires_grad_(True)
    q(x).sum().backward()
    # -0.2/0.02 = -10 < -8 and 5.0/0.5 = 10 > 7 are clipped
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 1, 1, 1, 0]))


# ---- twin_softmax --------------------------------------------------------------------------------
XS = torch.tensor([0.0, 0.01, 0.1, 0.2, 0.3, 0.6, 1.0])


def test_twin_softmax_values():
    # b=4: n = 2^(b-1)-1 = 7; split 0.25, low step 0.25/7. high = round(clamp(x,.25,1)·7)/7,
    # low = round(clamp(x,0,.25)·28)/28, summed as PTQ4ViT's released code does (matmul.py:595-598)
    q = make_quantizer(SOFTMAX, 4)
    q.set_params(0.25)
    expected = [2 / 7, 2 / 7, 2 / 7 + 3 / 28, 2 / 7 + 6 / 28, 2 / 7 + 0.25, 4 / 7 + 0.25, 1.25]
    assert close(q(XS), expected)
    x = XS.clone().requires_grad_(True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(7))


def test_twin_softmax_default_and_set_bits():
    q = make_quantizer(SOFTMAX, 4)
    calibrate(nn.Sequential(QuantTap.from_float(Tap("probs"), q)), [XS])
    assert close(q.split, [0.01]) and close(q.scale, [0.01 / 7])
    # split 0.01: high = round(clamp(x,.01,1)·7)/7, low = round(clamp(x,0,.01)·700)/700
    assert close(q(torch.tensor([0.004, 0.3])), [0.0 + 3 / 700, 2 / 7 + 0.01])
    q.set_params(0.25)
    q.set_bits(8)
    assert close(q.split, [0.25]) and close(q.scale, [0.25 / 127])


# ---- outlier_2sf ---------------------------------------------------------------------------------
XO = torch.tensor([[0.66, -1.4, 0.35, 12.0], [-0.33, 0.52, -0.13, -5.0]])


def test_outlier_2sf_default_values():
    # channel maxima [0.66, 1.4, 0.35, 12]; median (lower) 0.66, normal <= 2.64: Δ = 1.4/7 = 0.2;
    # channel 3 > 1.4: smallest t with 12 <= 1.4·2^t is 4 (step 3.2)
    q = make_quantizer(O2SF, 4)
    calibrate(nn.Sequential(QuantTap.from_float(Tap("res1"), q)), [XO])
    assert close(q.scale, [0.2]) and q.channel_shift.tolist() == [0, 0, 0, 4] and q.shift == 4
    assert close(q(XO), [[0.6, -1.4, 0.4, 12.8], [-0.4, 0.6, -0.2, -6.4]], atol=1e-5)


def test_outlier_2sf_max_shift_and_ste():
    q = make_quantizer(QuantizerSpec(kind="outlier_2sf", outlier_max_shift=2), 4)
    q(XO)  # lazy init; t = T = 2 does not cover 12: step 0.8, 12 -> 7 (clipped), -5 -> -6
    assert q.channel_shift.tolist() == [0, 0, 0, 2]
    assert close(q(XO)[:, 3], [5.6, -4.8])
    x = XO.clone().requires_grad_(True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError):
        q(torch.zeros(2, 5))


def test_outlier_2sf_set_bits():
    q = make_quantizer(O2SF, 4)
    q(XO)
    q.set_bits(8)  # from the statistics: Δ = 1.4/127, 12 <= 1.4·2^t·... t = 4
    assert close(q.scale, [1.4 / 127]) and q.channel_shift.tolist() == [0, 0, 0, 4]
    q.set_params(0.05, 2, q.channel_max())  # 12 > 0.05·127: channel 3 shifted by 2
    q.set_bits(4)  # searched: clip range Δ·127 kept
    assert close(q.scale, [0.05 * 127 / 7]) and q.channel_shift.tolist() == [0, 0, 0, 2]


# ---- in modules, calibration, state keys ---------------------------------------------------------
def test_calibrate_tiny_module():
    torch.manual_seed(0)
    lin = QuantLinear.from_float(nn.Linear(9, 3), a_quant=make_quantizer(GELU, 4))
    mm = QuantMatMul.from_float(MatMul("av"), a_quant=make_quantizer(SOFTMAX, 4))
    x = XG.repeat(2, 1)
    calibrate(lin, [x, x * 0.5])
    assert close(lin.a_quant.scale, [5.0 / 7.5]) and close(lin.a_quant.neg_scale, [GELU_NEG_RANGE / 8])
    ref = nn.functional.linear(lin.a_quant(x), lin.weight, lin.bias)
    assert torch.equal(lin(x), ref)
    p, v = torch.softmax(torch.randn(2, 5, 5), -1), torch.randn(2, 5, 4)
    calibrate(mm, [(p, v)], forward=lambda m, b: m(*b))
    assert close(mm.a_quant.split, [0.01])
    assert torch.allclose(mm(p, v), mm.a_quant(p) @ v)


@pytest.mark.parametrize("spec,x", [(GELU, XG), (SOFTMAX, XS), (O2SF, XO)])
def test_state_key_changes(spec, x):
    q = make_quantizer(spec, 4)
    q(x)
    k0 = q.state_key()
    assert q.state_key() == k0
    if spec is GELU:
        q.set_params(0.4, k=2)
    elif spec is SOFTMAX:
        q.set_params(0.125)
    else:
        q.set_params(0.3, 1, q.channel_max())
    k1 = q.state_key()
    assert k1 != k0
    q.scale.mul_(2)  # in place
    assert q.state_key() != k1
    k2 = q.state_key()
    q.set_bits(6)
    assert q.state_key() != k2


def test_state_dict_round_trip():
    q = make_quantizer(GELU, 4)
    q.set_params(0.5, k=3)
    r = make_quantizer(GELU, 4)
    r.load_state_dict(q.state_dict())
    assert r.k == 3 and torch.equal(r(XG), q(XG))
