"""Fake quantizers: values against hand-computed numbers, STE masks, LSQ gradients, modes, caching.

Hand computations use x = [-1.0, -0.3, 0.2, 0.9] unless noted; inputs are chosen so that no value
lands on a rounding tie (x/scale = k + 0.5), where float reciprocal rounding could go either way.
"""

from __future__ import annotations

import copy
import math
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

from methods.quant import qfunc
from methods.quant.modules import QuantLinear
from methods.quant.qfunc import int_range, uniform_params
from methods.quant.quantizers import (
    FakeQuantizer,
    Log2Quantizer,
    LSQQuantizer,
    QuantizerSpec,
    UniformQuantizer,
    make_quantizer,
)

X = torch.tensor([-1.0, -0.3, 0.2, 0.9])
ASYM = QuantizerSpec()
SYM = QuantizerSpec(symmetric=True)
V1 = QuantizerSpec(symmetric=True, v1_scale=True)


def close(a: torch.Tensor, b, atol: float = 1e-6) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


def calibrated(spec: QuantizerSpec, bits: int, *batches: torch.Tensor) -> FakeQuantizer:
    q = make_quantizer(spec, bits)
    q.start_calibration()
    for b in batches:
        assert torch.equal(q(b), b)  # calibration is identity
    q.finish_calibration()
    assert q.mode == "quant"
    return q


def test_int_ranges():
    assert int_range(2, True) == (-2, 1) and int_range(2, False) == (0, 3)
    assert int_range(4, True) == (-8, 7) and int_range(8, False) == (0, 255)
    with pytest.raises(ValueError):
        int_range(1, False)


# ---- uniform, min-max ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits, scale, zp, codes",
    [
        # scale = 1.9/(2^b-1); zp = clamp(-round(-1/scale), 0, 2^b-1); codes = clamp(round(x/s)+zp) - zp
        (2, 1.9 / 3, 2, [-2, 0, 0, 1]),  # x/s = [-1.58, -0.47, 0.32, 1.42]
        (3, 1.9 / 7, 4, [-4, -1, 1, 3]),  # x/s = [-3.68, -1.11, 0.74, 3.32]
        (4, 1.9 / 15, 8, [-8, -2, 2, 7]),  # x/s = [-7.89, -2.37, 1.58, 7.11]
    ],
)
def test_asymmetric_minmax_values(bits, scale, zp, codes):
    q = calibrated(ASYM, bits, X)
    assert close(q.scale, [scale]) and q.zero_point.tolist() == [zp]
    assert close(q(X), [c * scale for c in codes])


@pytest.mark.parametrize(
    "bits, scale, codes",
    [
        (2, 1.0, [-1, 0, 0, 1]),  # scale = max|x|/(2^(b-1)-1) = 1/1
        (3, 1 / 3, [-3, -1, 1, 3]),  # x/s = [-3, -0.9, 0.6, 2.7]
        (4, 1 / 7, [-7, -2, 1, 6]),  # x/s = [-7, -2.1, 1.4, 6.3]
    ],
)
def test_symmetric_minmax_values(bits, scale, codes):
    q = calibrated(SYM, bits, X)
    assert close(q.scale, [scale]) and q.zero_point.tolist() == [0]
    assert close(q(X), [c * scale for c in codes])


@pytest.mark.parametrize(
    "bits, codes",
    [
        (2, [-1, 0, 0, 1]),  # x/s with s = 1/1.5: [-1.2, -0.45, 0.375, 1.5 -> clamp 1]
        (3, [-3, -1, 1, 3]),  # s = 1/3.5: [-2.8, -1.05, 0.875, 3.5 -> clamp 3]
        (4, [-6, -2, 2, 7]),  # s = 1/7.5: [-6, -2.25, 1.875, 7.5 -> clamp 7]
    ],
)
def test_psaq_v1_scale_values(bits, codes):
    x = torch.tensor([-0.8, -0.3, 0.25, 1.0])
    scale = 1.0 / ((2**bits - 1) / 2)
    q = calibrated(V1, bits, x)
    assert close(q.scale, [scale])
    assert close(q(x), [c * scale for c in codes])
    # the max lands half a step above qmax and is clipped to qmax
    assert close(q(x)[-1:], [(2 ** (bits - 1) - 1) * scale])


def test_running_minmax_over_batches():
    q = calibrated(ASYM, 4, torch.tensor([-0.5, 0.2]), torch.tensor([0.0, 1.0]))
    assert close(q.scale, [1.5 / 15]) and q.zero_point.tolist() == [5]  # -round(-0.5/0.1) = 5


def test_include_zero_and_literal_v1_formula():
    x = torch.tensor([0.2, 0.5, 1.0])  # positive-only range
    widened = calibrated(ASYM, 2, x)  # range [0, 1]: scale 1/3, zp 0
    assert close(widened.scale, [1 / 3]) and widened.zero_point.tolist() == [0]
    assert close(widened(x), [1 / 3, 2 / 3, 1.0])  # x/s = [0.6, 1.5->2, 3]
    literal = calibrated(QuantizerSpec(include_zero=False), 2, x)  # scale 0.8/3, zp clamp(-1) = 0
    assert close(literal.scale, [0.8 / 3]) and literal.zero_point.tolist() == [0]
    assert close(literal(x), [0.8 / 3, 0.8 / 3 * 2, 0.8])  # 1.0 clipped to 3·s = 0.8 (V1's flaw)


def test_per_channel_symmetric_weights():
    w = torch.tensor([[-1.0, -0.3, 0.2, 0.9], [0.5, -0.2, 0.1, 0.3]])
    q = calibrated(QuantizerSpec(symmetric=True, per_channel=True, ch_axis=0), 4, w)
    assert close(q.scale, [1 / 7, 0.5 / 7])
    expected = [[-1.0, -2 / 7, 1 / 7, 6 / 7], [0.5, -3 * 0.5 / 7, 0.5 / 7, 4 * 0.5 / 7]]
    assert close(q(w), expected)


def test_per_channel_asymmetric_last_axis():
    x = torch.tensor([[[-1.0, 0.0], [0.5, 3.0]], [[0.0, 1.5], [0.2, 0.0]]])  # (2, 2, C=2)
    q = calibrated(QuantizerSpec(per_channel=True, ch_axis=-1), 2, x)
    # channel 0: [-1, 0.5] -> s = 0.5, zp 2; channel 1: [0, 3] -> s = 1, zp 0
    assert close(q.scale, [0.5, 1.0]) and q.zero_point.tolist() == [2, 0]
    expected = [[[-1.0, 0.0], [0.5, 3.0]], [[0.0, 2.0], [0.0, 0.0]]]  # 1.5 -> 2 (tie to even)
    assert close(q(x), expected)


# ---- percentile, MSE, dynamic ----------------------------------------------------------------


def test_percentile_asymmetric_and_symmetric():
    # torch.quantile (linear): q75 = 0.2 + 0.25·0.7 = 0.375, q25 = -1 + 0.75·0.7 = -0.475
    q = calibrated(QuantizerSpec(range="percentile", percentile=75.0), 2, X)
    s = 0.85 / 3  # zp = -round(-0.475/s) = 2; codes clamp(round(x/s)+2, 0, 3) - 2
    assert close(q.scale, [s]) and q.zero_point.tolist() == [2]
    assert close(q(X), [-2 * s, -s, s, s])
    # symmetric: quantile(|x|, 0.75) over [0.2, 0.3, 0.9, 1.0] = 0.925, s = 0.925/3 at 3 bits
    q = calibrated(QuantizerSpec(symmetric=True, range="percentile", percentile=75.0), 3, X)
    assert close(q.scale, [0.925 / 3])
    assert close(q(X), [-0.925, -0.925 / 3, 0.925 / 3, 0.925])


def test_mse_search_picks_clipping_ratio():
    # 2-bit symmetric, ratios [1, .75, .5, .25] of max|x|: squared errors 0.96, 0.7975, 0.31, 0.6725
    spec = QuantizerSpec(symmetric=True, range="mse", mse_grid=4, mse_min_ratio=0.25)
    x = torch.tensor([0.4, 0.4, 0.4, 0.4, -0.4, -0.4, 1.0])
    q = calibrated(spec, 2, x)
    assert close(q.scale, [0.5])
    assert close(q(x), [0.5, 0.5, 0.5, 0.5, -0.5, -0.5, 0.5])
    # per channel: second row's best ratio is 0.75 (errors .37, .2325, .47, 1.37)
    w = torch.stack([x, torch.tensor([1.0, -1.0, 0.6, 0.2, 0.0, -0.6, 0.9])])
    qc = calibrated(QuantizerSpec(symmetric=True, per_channel=True, range="mse", mse_grid=4,
                                  mse_min_ratio=0.25), 2, w)
    assert close(qc.scale, [0.5, 0.75])
    assert close(qc(w)[1], [0.75, -0.75, 0.75, 0.0, 0.0, -0.75, 0.75])


def test_percentile_mse_picks_the_least_error_percentile():
    # 2-bit symmetric (grid -2..1), |x| quantile 75 = 0.4 (scale 0.4): squared error 0.36 (only 1.0 clips);
    # quantile 100 = 1.0 (scale 1.0): each 0.4 rounds to 0, error 6 * 0.16 = 0.96. The 75th wins.
    x = torch.tensor([0.4, 0.4, 0.4, 0.4, -0.4, -0.4, 1.0])
    spec = QuantizerSpec(symmetric=True, range="percentile_mse", search_percentiles=(100.0, 75.0))
    q = calibrated(spec, 2, x)
    assert close(q.scale, [0.4])
    assert close(q(x), [0.4, 0.4, 0.4, 0.4, -0.4, -0.4, 0.4])
    # log2: top level 1.0 (100th) vs quantile(x, 0.5) = 0.25 over [0.0625, 0.25, 0.25, 1.0]
    p = torch.tensor([0.0625, 0.25, 0.25, 1.0])
    log_spec = QuantizerSpec(kind="log2", range="percentile_mse", search_percentiles=(50.0, 100.0))
    lq = calibrated(log_spec, 2, p)
    assert close(lq.scale, [1.0])  # levels 1..1/8: only 0.0625 underflows (0.0039); 0.25 clips 1.0 (0.5625)
    with pytest.raises(ValueError, match="search_percentiles"):
        QuantizerSpec(range="percentile_mse", search_percentiles=())


def test_mse_never_worse_than_minmax(seed):
    x = torch.randn(4096) ** 3
    for bits in (3, 4):
        e_mse = (calibrated(QuantizerSpec(range="mse"), bits, x)(x) - x).pow(2).sum()
        e_mm = (calibrated(ASYM, bits, x)(x) - x).pow(2).sum()
        assert e_mse <= e_mm + 1e-6


def test_dynamic_recomputes_every_forward():
    q = make_quantizer(QuantizerSpec(symmetric=True, per_channel=True, range="dynamic", v1_scale=True), 3)
    w = torch.tensor([[-0.8, -0.3, 0.25, 1.0]])
    s = 1 / 3.5
    assert close(q(w), [[-3 * s, -s, s, 3 * s]])
    assert close(q(2 * w), [[-6 * s, -2 * s, 2 * s, 6 * s]])  # scale doubled with the input
    assert q.scale.numel() == 0  # nothing stored
    q.start_calibration()
    assert torch.equal(q(w), w)  # calibration pass is full precision for every quantizer
    q.finish_calibration()
    assert close(q(w), [[-3 * s, -s, s, 3 * s]])


# ---- log2 ------------------------------------------------------------------------------------


def test_log2_values():
    x = torch.tensor([0.0, 0.05, 0.3, 0.9])
    q = calibrated(QuantizerSpec(kind="log2"), 2, x)  # scale = max = 0.9; k = round(-log2(x/0.9))
    assert close(q.scale, [0.9])
    # k: inf -> 0 (zero), 4.17 -> 4 > 3 underflow -> 0, 1.58 -> 2, 0 -> 0
    assert close(q(x), [0.0, 0.0, 0.9 / 4, 0.9])
    q3 = calibrated(QuantizerSpec(kind="log2"), 3, x)  # k up to 7: 0.05 -> 0.9/16
    assert close(q3(x), [0.0, 0.9 / 16, 0.9 / 4, 0.9])


def test_log_sqrt2_values():
    q = make_quantizer(QuantizerSpec(kind="log_sqrt2"), 2)
    q.scale = torch.tensor([1.0])
    # k = round(-2·log2 x): 0.05 -> 8.64 -> 9 > 3 (zero); 0.3 -> 3.47 -> 3; 0.6 -> 1.47 -> 1; 0.9 -> 0
    x = torch.tensor([0.0, 0.05, 0.3, 0.6, 0.9])
    assert close(q(x), [0.0, 0.0, 2**-1.5, 2**-0.5, 1.0])


def test_log2_ste_mask():
    q = make_quantizer(QuantizerSpec(kind="log2"), 3)
    q.scale = torch.tensor([1.0])
    x = torch.tensor([0.0, 0.001, 0.3, 1.0, 1.4, 1.5, 2.0], requires_grad=True)
    y = q(x)
    assert close(y.detach(), [0.0, 0.0, 0.25, 1.0, 1.0, 1.0, 1.0])
    y.sum().backward()
    # clipped iff round(-log2(x)) < 0, i.e. x > sqrt(2); underflow to 0 is rounding (gradient passes)
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


# ---- straight-through estimator --------------------------------------------------------------


def test_uniform_ste_mask_exact():
    q = calibrated(ASYM, 2, X)  # s = 1.9/3, zp = 2: codes clamp(round(x/s) + 2, 0, 3)
    s = 1.9 / 3
    # inside iff -2.5·s <= x < 1.5·s, i.e. [-1.583, 0.95) (round then clamp): -1.7 and 1.0 are outside
    x = torch.tensor([-2.0, -1.7, -1.5, 0.0, 0.9, 1.0, 3.0], requires_grad=True)
    y = q(x)
    y.backward(torch.arange(1.0, 8.0))
    assert x.grad.tolist() == [0.0, 0.0, 3.0, 4.0, 5.0, 0.0, 0.0]
    assert close(y.detach(), [-2 * s, -2 * s, -2 * s, 0.0, s, s, s])


def test_per_channel_ste_mask_and_matches_nograd():
    w = torch.tensor([[-1.0, -0.3, 0.2, 0.9], [0.5, -0.2, 0.1, 0.3]])
    q = calibrated(QuantizerSpec(symmetric=True, per_channel=True), 4, w)
    x = torch.tensor([[-1.2, 0.5, 1.05, 1.1], [-0.6, 0.52, 0.54, 0.0]], requires_grad=True)
    y = q(x)
    with torch.no_grad():
        assert torch.equal(y, q(x))  # the two code paths agree
    y.sum().backward()
    # row 0, s = 1/7: -1.2·7 = -8.4 -> -8 in; 1.05·7 = 7.35 -> 7 in; 1.1·7 = 7.7 -> 8 out
    # row 1, s = 0.5/7: -0.6 -> -8.4 in; 0.52 -> 7.28 in; 0.54 -> 7.56 -> 8 out
    assert x.grad.tolist() == [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]]


# ---- LSQ -------------------------------------------------------------------------------------


def test_lsq_symmetric_gradients():
    q = make_quantizer(QuantizerSpec(symmetric=True, range="lsq"), 2)  # grid [-2, 1]
    assert isinstance(q, LSQQuantizer)
    q(X)  # init from first batch
    q.scale.data = torch.tensor([0.5])
    x = X.clone().requires_grad_()
    y = q(x)  # x/s = [-2, -0.6, 0.4, 1.8] -> [-2, -1, 0, 1 (clipped)]
    assert close(y.detach(), [-1.0, -0.5, 0.0, 0.5])
    y.sum().backward()
    # d/ds: inside round(v) - v = [0, -0.4, -0.4], clipped qmax = 1 -> 0.2; g = 1/sqrt(4·1)
    assert math.isclose(q.scale.grad.item(), 0.2 * 0.5, abs_tol=1e-6)
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_lsq_asymmetric_gradients():
    q = make_quantizer(QuantizerSpec(range="lsq"), 2)  # grid [0, 3]
    q(X)
    q.scale.data, q.zero_point.data = torch.tensor([0.5]), torch.tensor([1.0])
    x = X.clone().requires_grad_()
    y = q(x)  # x/s + z = [-1, 0.4, 1.4, 2.8] -> [0 (clipped), 0, 1, 3]
    assert close(y.detach(), [-0.5, -0.5, 0.0, 1.0])
    y.sum().backward()
    g = 1 / math.sqrt(4 * 3)
    # d/ds: clipped low qmin - z = -1; inside (round(v) - z) - x/s = -0.4, -0.4, 0.2 -> -1.6
    assert math.isclose(q.scale.grad.item(), -1.6 * g, abs_tol=1e-6)
    # d/dz: 0 inside, -s on the clipped element
    assert math.isclose(q.zero_point.grad.item(), -0.5 * g, abs_tol=1e-6)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0]


def test_lsq_init_rules():
    q = calibrated(QuantizerSpec(range="lsq"), 4, X)  # min-max init, same as the uniform quantizer
    u = calibrated(ASYM, 4, X)
    assert close(q.scale.detach(), u.scale) and q.zero_point.item() == u.zero_point.item()
    assert close(q(X).detach(), u(X))
    p = calibrated(QuantizerSpec(symmetric=True, range="lsq", lsq_init="lsq"), 4, X)
    assert close(p.scale.detach(), [2 * 0.6 / math.sqrt(7)])  # 2·mean|x| / sqrt(qmax)
    assert not p.zero_point.requires_grad


# ---- modes, bits, state ----------------------------------------------------------------------


def test_modes_and_identity():
    q = calibrated(ASYM, 2, X)
    q.disable()
    assert q.mode == "off" and torch.equal(q(X), X)
    q.enable()
    assert not torch.equal(q(X), X)
    assert torch.equal(make_quantizer(ASYM, None)(X), X)  # bits None = identity
    with pytest.raises(ValueError):
        q.set_mode("bogus")


def test_set_bits_recomputes_from_statistics():
    q = calibrated(ASYM, 2, X)
    q.set_bits(4)
    assert close(q.scale, [1.9 / 15]) and q.zero_point.tolist() == [8]
    loaded = UniformQuantizer(ASYM, 2)
    loaded.load_state_dict(calibrated(ASYM, 2, X).state_dict())  # lazily shaped buffers load
    assert close(loaded(X), calibrated(ASYM, 2, X)(X))
    loaded.set_bits(4)  # no statistics: re-derive from the 2-bit range [(0-2)s, (3-2)s]
    lo, hi = -2 * 1.9 / 3, 1.9 / 3
    assert close(loaded.scale, [(hi - lo) / 15])


def test_uncalibrated_quant_mode_inits_from_first_tensor():
    q = make_quantizer(ASYM, 4)
    assert torch.equal(q(X), calibrated(ASYM, 4, X)(X))
    assert q.initialized


def test_spec_roundtrip_and_validation():
    spec = QuantizerSpec(kind="uniform", symmetric=True, per_channel=True, range="mse", v1_scale=True)
    assert QuantizerSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError):
        QuantizerSpec.from_dict({"kind": "uniform", "bogus": 1})
    for bad in (dict(kind="log3"), dict(range="max"), dict(kind="log2", symmetric=True), dict(v1_scale=True)):
        with pytest.raises(ValueError):
            QuantizerSpec(**bad)
    assert isinstance(make_quantizer(QuantizerSpec(kind="log2"), 4), Log2Quantizer)


def test_uniform_params_function_matches_convention():
    s, z = uniform_params(torch.tensor([-1.0]), torch.tensor([0.9]), 3, symmetric=False)
    assert close(s, [1.9 / 7]) and z.tolist() == [4]
    s, z = uniform_params(torch.tensor([-1.0]), torch.tensor([0.5]), 3, symmetric=True, v1_scale=True)
    assert close(s, [1 / 3.5]) and z.tolist() == [0]


def test_nograd_outputs_are_fresh_contiguous_and_match_the_ste_path(seed):
    q = calibrated(ASYM, 8, torch.randn(300, 300))
    a, b = torch.randn(300, 300), torch.randn(300, 300)
    with torch.inference_mode():
        ya = q(a)
        ya_copy = ya.clone()
        view = q(b)[:10]  # the full output is dropped, a view stays alive
        view_copy = view.clone()
        for _ in range(3):
            q(torch.randn(300, 300))
        assert torch.equal(ya, ya_copy) and torch.equal(view, view_copy)  # later calls write elsewhere
    xt = torch.randn(2, 300, 300).transpose(1, 2)  # a non-contiguous input
    with torch.no_grad():
        y = q(xt)
    assert y.is_contiguous() and y.data_ptr() != xt.data_ptr()
    assert torch.equal(y, q(xt.clone().requires_grad_()).detach())  # same values as the STE path
    s, zp = q.scale.item(), q.zero_point.item()
    assert torch.equal(y, (torch.round(xt * (1 / s)).clamp(-zp, 255 - zp)) * s)  # the documented formula


def test_broken_rounding_plugin_breaks_every_uniform_arithmetic(monkeypatch):
    x = torch.tensor([[-0.85, -0.4, 0.35, 0.7, 0.9]])  # off .5 ties; some fractions above .5 everywhere
    specs = {
        "reciprocal": QuantizerSpec(symmetric=True, per_channel=True),
        "reciprocal per tensor": ASYM,
        "divide": QuantizerSpec(symmetric=True, per_channel=True, v1_scale=True, arith="divide"),
        "zeroq": QuantizerSpec(symmetric=True, per_channel=True, v1_scale=True, range="dynamic",
                               arith="zeroq"),
    }
    good = {k: calibrated(spec, 3, x) for k, spec in specs.items()}
    ref = {k: (q(x), q(x.clone().requires_grad_()).detach()) for k, q in good.items()}
    monkeypatch.setattr(qfunc, "_fq_nograd", qfunc._fq_nograd)  # restores the original afterwards
    runpy.run_path(str(Path(__file__).parent / "plugins" / "broken_rounding.py"))
    for k, q in good.items():
        nograd, ste = ref[k]
        assert not torch.equal(q(x), nograd), k
        assert not torch.equal(q(x.clone().requires_grad_()).detach(), ste), k
    # by hand: symmetric 3 bits, s = 0.9/3: x/s = [-2.83, -1.33, 1.17, 2.33] -> toward zero [-2, -1, 1, 2]
    assert close(good["reciprocal"](x)[:, :4], [[-0.6, -0.3, 0.3, 0.6]])


# ---- frozen weight cache ---------------------------------------------------------------------


def test_frozen_weight_cache_tracks_weight_and_quantizer():
    lin = nn.Linear(4, 2)
    spec = QuantizerSpec(symmetric=True, per_channel=True, range="dynamic")
    ql = QuantLinear.from_float(lin, make_quantizer(spec, 4))
    assert ql.weight is lin.weight
    calls = []
    ql.w_quant.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 4)
    ql.freeze()
    with torch.no_grad():
        y1 = ql(x)
        y2 = ql(x)
        assert len(calls) == 1 and torch.equal(y1, y2)  # quantized once
        ql.weight.mul_(2)  # in-place update invalidates the cache (dynamic range: scale doubles too)
        assert torch.allclose(ql(x) - ql.bias, 2 * (y1 - ql.bias), atol=1e-5) and len(calls) == 2
        ql.w_quant.set_bits(8)
        ql(x)
        assert len(calls) == 3
        ref = x @ ql.w_quant(ql.weight).t() + ql.bias
        assert torch.allclose(ql(x), ref, atol=1e-6)
    y = ql(x)  # grad enabled and weight requires grad: no cache, gradient reaches the weight
    y.sum().backward()
    assert ql.weight.grad is not None
    clone = copy.deepcopy(ql)  # deep copies recompute for their own weight
    with torch.no_grad():
        clone.weight.zero_()
        assert torch.allclose(clone(x), clone.bias.expand(3, 2))


def test_state_changes_invalidate_cached_constants_and_weights():
    q = calibrated(SYM, 3, X)
    q(X)
    q.scale = torch.tensor([0.5])  # a new tensor: a new state key
    assert close(q(X), [-1.0, -0.5, 0.0, 1.0])  # x/0.5 = [-2, -0.6, 0.4, 1.8], grid [-4, 3]
    q.scale.mul_(0.5)  # in-place update bumps the version
    assert close(q(X), [-1.0, -0.25, 0.25, 0.75])  # x/0.25 = [-4, -1.2, 0.8, 3.6 -> 3]
    q.bits = 2  # assigned directly: the grid narrows to [-2, 1], the scale stays 0.25
    assert close(q(X), [-0.5, -0.25, 0.25, 0.25])
    q.disable()
    assert torch.equal(q(X), X)
    q.enable()
    assert close(q(X), [-0.5, -0.25, 0.25, 0.25])
    ql = QuantLinear.from_float(nn.Linear(4, 2, bias=False), make_quantizer(SYM, 4))
    ql.freeze()
    x = torch.eye(4)
    with torch.no_grad():
        before = ql(x)
        ql.w_quant.start_calibration()
        ql(x)
        ql.w_quant.finish_calibration()
        ql.w_quant.scale = ql.w_quant.scale * 4  # coarser grid -> different cached weight
        assert not torch.equal(ql(x), before)
        assert torch.equal(ql(x), ql.w_quant(ql.weight).t())


def test_state_key_tracks_bits_mode_spec_and_tensors():
    q = calibrated(SYM, 3, X)
    key = q.state_key()
    assert q.state_key() == key  # nothing changed
    changes = {
        "bits": lambda: setattr(q, "bits", 4),
        "set_bits": lambda: q.set_bits(3),
        "mode": lambda: q.set_mode("off"),
        "spec": lambda: setattr(q, "spec", V1),
        "new tensor": lambda: setattr(q, "scale", q.scale.clone()),
        "in place": lambda: q.scale.add_(0.0),
        "state dict": lambda: q.load_state_dict(q.state_dict()),
    }
    for what, change in changes.items():
        change()
        new = q.state_key()
        assert new != key, what
        key = new
    assert calibrated(SYM, 3, X).state_key() != calibrated(SYM, 3, X).state_key()  # two quantizers


def _row_linear(row: list[float], w_quant: FakeQuantizer) -> QuantLinear:
    lin = nn.Linear(len(row), 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([row]))
    return QuantLinear.from_float(lin, w_quant)


def test_frozen_weight_cache_is_invalidated_by_every_change():
    # one output channel [-1, -0.3, 0.2, 0.9], per-channel symmetric min-max; ql(eye) = the used weight
    w_quant = make_quantizer(QuantizerSpec(symmetric=True, per_channel=True), 3)
    ql = _row_linear([-1.0, -0.3, 0.2, 0.9], w_quant)
    calls = []
    ql.w_quant.register_forward_hook(lambda *a: calls.append(1))
    eye = torch.eye(4)

    def used_weight() -> torch.Tensor:
        with torch.no_grad():
            return ql(eye)[:, 0]

    ql.freeze()  # initialises from the weight: s = 1/3, x/s = [-3, -0.9, 0.6, 2.7]
    assert close(used_weight(), [-1.0, -1 / 3, 1 / 3, 1.0])
    used_weight()
    assert len(calls) == 1  # quantized once, at freeze
    ql.w_quant.set_bits(4)  # s = 1/7: x/s = [-7, -2.1, 1.4, 6.3]
    assert close(used_weight(), [-1.0, -2 / 7, 1 / 7, 6 / 7])
    ql.w_quant.bits = 3  # assigned directly: s stays 1/7, grid [-4, 3]
    assert close(used_weight(), [-4 / 7, -2 / 7, 1 / 7, 3 / 7])
    ql.w_quant.disable()
    assert torch.equal(used_weight(), ql.weight[0].detach())
    ql.w_quant.enable()
    assert close(used_weight(), [-4 / 7, -2 / 7, 1 / 7, 3 / 7])
    ql.w_quant.scale = torch.tensor([0.5])  # x/s = [-2, -0.6, 0.4, 1.8]
    assert close(used_weight(), [-1.0, -0.5, 0.0, 1.0])
    ql.w_quant.scale.mul_(0.5)  # x/s = [-4, -1.2, 0.8, 3.6 -> clamp 3]
    assert close(used_weight(), [-1.0, -0.25, 0.25, 0.75])
    n = len(calls)
    used_weight()
    assert len(calls) == n  # and cached again

    opt = torch.optim.SGD([ql.weight], lr=1.0)  # weight[1]: -0.3 - 0.2 = -0.5 -> x/s = -2
    ql.weight.grad = torch.tensor([[0.0, 0.2, 0.0, 0.0]])
    opt.step()
    assert close(used_weight(), [-1.0, -0.5, 0.25, 0.75])
    ql.weight.data = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # same Parameter and version, new storage
    assert close(used_weight(), [0.0, 0.25, 0.25, 0.5])  # x/s = [0.4, 0.8, 1.2, 1.6]
    ql.double()
    eye = eye.double()
    assert used_weight().dtype == torch.float64 and close(used_weight(), [0.0, 0.25, 0.25, 0.5])
    ql.w_quant = nn.Identity()  # another weight quantizer at the site
    assert torch.equal(used_weight(), ql.weight[0].detach())


def test_frozen_weight_cache_follows_an_optimiser_step_on_the_quantizer():
    lsq = make_quantizer(QuantizerSpec(symmetric=True, range="lsq"), 3)
    ql = _row_linear([-1.0, -0.3, 0.2, 0.9], lsq)
    ql.weight.requires_grad_(False)
    ql.freeze()  # min-max init: s = 1/3
    with torch.no_grad():
        assert close(ql(torch.eye(4))[:, 0], [-1.0, -1 / 3, 1 / 3, 1.0])
    opt = torch.optim.SGD([lsq.scale], lr=1.0)
    lsq.scale.grad = torch.tensor([1 / 3 - 0.5])  # step to s = 0.5: x/s = [-2, -0.6, 0.4, 1.8]
    opt.step()
    with torch.no_grad():
        assert close(ql(torch.eye(4))[:, 0], [-1.0, -0.5, 0.0, 1.0])
