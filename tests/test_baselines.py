"""Baselines on tiny random timm models: fp, minmax-ptq, noise-ptq and psaq-vit (V1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import SPEC, make_ctx, make_target, tiny_swin, tiny_vit
from torch import nn

from methods.base import get_method
from methods.baselines import psaq_v1_policy
from methods.quant.bits import parse_bits
from methods.quant.modules import MatMul, QuantConv2d, QuantTap, Tap
from methods.quant.policy import apply_policy
from methods.quant.quantizers import FakeQuantizer
from methods.quant.surgery import AttentionRecorder
from methods.synth.optimize import Stage
from methods.synth.pse_generation import generate_pse_images

torch.set_num_threads(1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------
# PSE generation on a real (prepared) model


def _generate(model, seed, iters=8, batch=4, family="vit"):
    return generate_pse_images(
        model, model, SPEC, batch_size=batch, stages=[Stage(iters, 1, 2), Stage(iters, 2, 2)], lr=0.2,
        generator=torch.Generator().manual_seed(seed), num_classes=10, tv_scale=0.05,
    )


def test_generation_deterministic_and_reduces_loss():
    model = tiny_vit()
    a, b = _generate(model, 3), _generate(model, 3)
    assert torch.equal(a.images, b.images)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert not torch.equal(a.images, _generate(model, 4).images)
    first = sum(h["loss"] for h in a.history[:3]) / 3
    last = sum(h["loss"] for h in a.history[-3:]) / 3
    assert last < first
    lo, hi = SPEC.valid_range()
    assert a.images.min() >= lo.min() - 1e-6 and a.images.max() <= hi.max() + 1e-6
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_generation_swin_windows_grouped():
    res = _generate(tiny_swin(), 0, iters=3, batch=2, family="swin")
    assert res.images.shape == (2, 1, 16, 16)
    assert {"pse", "tv", "ce"} <= set(res.history[0])


def test_swin_windows_are_image_major():
    """PSE groups a Swin block's windows per image with reshape(B, -1): check timm's window order."""
    model = tiny_swin()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), AttentionRecorder(model) as rec:
        model(x)
        both = [t.clone() for t in rec.outputs["av"]]
        model(x[1:])
        second = rec.outputs["av"]
    for av2, av1 in zip(both, second, strict=True):
        assert av2.shape[0] == 2 * av1.shape[0]
        torch.testing.assert_close(av2[av1.shape[0]:], av1, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# V1 policy placement


def test_v1_policy_sites_on_tiny_vit():
    model = tiny_vit()
    resolved = apply_policy(model, psaq_v1_policy(), parse_bits("w4a8"))
    names = set(resolved.layers)
    expected = {"patch_embed.proj", "head", "tap_pos"}
    for i in range(2):
        b = f"blocks.{i}"
        expected |= {f"{b}.attn.qkv", f"{b}.attn.proj", f"{b}.mlp.fc1", f"{b}.mlp.fc2",
                     f"{b}.attn.tap_scores", f"{b}.tap_res1", f"{b}.tap_res2"}
    assert names == expected
    for i in range(2):
        attn, mlp = model.blocks[i].attn, model.blocks[i].mlp
        assert type(attn.tap_probs) is Tap  # softmax output stays FP
        assert type(attn.matmul1) is MatMul and type(attn.matmul2) is MatMul  # operands quantized upstream
        assert isinstance(attn.tap_scores, QuantTap) and attn.tap_scores.quant.bits == 8
        assert isinstance(mlp.fc1.out_quant, nn.Identity)  # GELU input FP
        assert isinstance(mlp.fc2.out_quant, FakeQuantizer) and mlp.fc2.out_quant.bits == 8
        assert attn.qkv.out_quant.bits == 8 and attn.qkv.a_quant.bits == 8 and attn.qkv.w_quant.bits == 4
        w = attn.qkv.w_quant.spec
        assert w.symmetric and w.per_channel and w.range == "dynamic" and w.v1_scale
        a = attn.qkv.a_quant.spec
        assert not a.symmetric and not a.per_channel and a.range == "minmax"
    assert isinstance(model.patch_embed.proj, QuantConv2d) and model.patch_embed.proj.out_quant.bits == 8
    assert resolved.layers["head"] == (4, 8)


# ------------------------------------------------------------------------------------------------
# Methods end to end


def test_fp_returns_model_unchanged(tmp_path, tiny_vit_model):
    """bits=fp never reaches a method's hooks: the template returns the task's model as it is."""
    model = tiny_vit_model
    for name in ("fp", "psaq-vit", "mimiq"):
        ctx = make_ctx(tmp_path)
        out = get_method(name)().quantize(make_target(model), parse_bits("fp"), ctx)
        assert out.model is model and out.resolved_bits.is_fp and out.policy is None
        assert not ctx.image_hashes and not ctx.timings  # nothing generated, nothing calibrated


def test_minmax_ptq_error_ordering(tmp_path, tiny_vit_model):
    model = tiny_vit_model
    target = make_target(model)
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(32, 1, 16, 16, generator=g)
    x = torch.randn(16, 1, 16, 16, generator=g)
    with torch.no_grad():
        ref = model(x)
    errs = {}
    for b in ("w8a8", "w4a4"):
        ctx = make_ctx(tmp_path, real=calib)
        out = get_method("minmax-ptq")().quantize(target, parse_bits(b), ctx)
        assert out.model is not model
        with torch.no_grad():
            errs[b] = rel_err(out.model(x), ref)
        assert out.resolved_bits.layers and out.policy["name"] == "minmax-ptq"
        assert "calibration" in ctx.timings and ctx.data_sources["calibration"]["source"] == "real"
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)  # FP model untouched
    assert errs["w8a8"] < 0.05
    assert errs["w4a4"] > 2 * errs["w8a8"]


def test_noise_ptq_calibrates_on_seeded_noise(tmp_path):
    """noise-ptq = minmax-ptq on the "noise" source: the same job with the real source fed that very
    noise gives the same model."""
    target = make_target(tiny_vit())
    ctx = make_ctx(tmp_path, seed=3)
    q = get_method("noise-ptq")().quantize(target, parse_bits("w8a8"), ctx).model
    noise = torch.randn(SPEC.shape(32), generator=ctx.generator())
    ptq = get_method("minmax-ptq")()
    ref = ptq.quantize(target, parse_bits("w8a8"), make_ctx(tmp_path, real=noise)).model
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(q(x), ref(x))
    assert ctx.data_sources["calibration"] == {"source": "noise", "images": 32, "data_free": True,
                                               "cached": False}


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_psaq_vit_ci_end_to_end_and_cache(tmp_path, family):
    cls = get_method("psaq-vit")
    cfg = cls.make_config("ci", iterations=4, warmup=1, batch_size=8)
    model = tiny_vit() if family == "vit" else tiny_swin()
    target = make_target(model, family)
    ctx = make_ctx(tmp_path, seed=5, use_cache=True, galleries=True)
    q = cls(cfg).quantize(target, parse_bits("w8a8"), ctx)
    assert (tmp_path / "art" / "psaq-vit_calibration.png").exists()  # the harness writes the gallery
    assert q.policy["name"] == "psaq-vit-v1" and q.resolved_bits.layers
    assert ctx.timings["generation"] > 0 and "calibration" in ctx.timings
    cached = list((tmp_path / "cache").glob("psaq-vit-*.pt"))
    assert len(cached) == 1
    ctx2 = make_ctx(tmp_path, seed=5, use_cache=True)
    q2 = cls(cfg).quantize(target, parse_bits("w8a8"), ctx2)
    assert any("cache" in n for n in ctx2.notes) and ctx2.data_sources["calibration"]["cached"]
    assert ctx2.image_hashes == ctx.image_hashes
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(q.model(x), q2.model(x))
    # uncached regeneration with the same seed gives the same images
    ctx3 = make_ctx(tmp_path, seed=5)
    a = cls(cfg).calibration_data(target, ctx3)
    torch.testing.assert_close(a, torch.load(cached[0]))


def test_psaq_vit_without_logits_notes(run_ctx, tiny_vit_model):
    cls = get_method("psaq-vit")
    cfg = cls.make_config("ci", iterations=2, warmup=1, batch_size=4)
    target = dataclasses.replace(make_target(tiny_vit_model), logits=None)
    ctx = run_ctx
    cls(cfg).quantize(target, parse_bits("w8a8"), ctx)
    assert any("no class logits" in n for n in ctx.notes)
