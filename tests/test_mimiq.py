"""MimiQ: the generation prior and loop against direct computations, the quantizer variants, policy,
determinism, det/seg path (SSIM and L_HAD: tests/test_losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import SPEC, make_ctx, make_target, tiny_swin, tiny_vit
from torch import nn

from methods.base import get_method
from methods.mimiq import first_layer, mimiq_policy
from methods.quant.bits import parse_bits
from methods.quant.modules import QuantConv2d, QuantLinear, QuantMatMul, Tap
from methods.quant.qat_quantizers import (
    FirstBatchLSQQuantizer,
    IdentitySTEUniformQuantizer,
    lsq_grad_scale,
)
from methods.quant.quantizers import QuantizerSpec, UniformQuantizer
from methods.quant.surgery import AttentionRecorder
from methods.quant.target import InputSpec
from methods.synth.attention_ssim import inter_head_similarity_loss, inter_head_ssim, minmax_normalize
from methods.synth.batch_augment import simclr_batch_augment
from methods.synth.interhead_generation import (
    color_shift,
    generate_interhead_images,
    offset_noise,
    offset_noise_remaining,
    roll_jitter,
)
from methods.synth.optimize import frozen_params
from methods.synth.priors import clamp_to_range, total_variation_l2

torch.set_num_threads(1)
TINY = dict(
    num_images=8, gen_batch_size=4, gen_iterations=3, epochs=4, batch_size=4, lr_steps=(3,),
)


def mimiq(**over):
    cls = get_method("mimiq")
    return cls(cls.make_config("ci", **{**TINY, **over}))


# ------------------------------------------------------------------------------------------------
# The generation prior (L_IH), its augmentation and the generation loop


def test_minmax_normalize_and_its_gradient_match_amin_amax():
    x = torch.randn(3, 5, 7, requires_grad=True)
    y = minmax_normalize(x)
    x2 = x.detach().clone().requires_grad_(True)
    shifted = x2 - x2.amin(-1, keepdim=True)
    y2 = shifted / (shifted.amax(-1, keepdim=True) + 1e-8)
    torch.testing.assert_close(y, y2)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def _released_inter_head_loss(logits: torch.Tensor, side: int) -> torch.Tensor:
    """ssim_loss_att_map as released (stack, drop CLS, (B N) H d, normalise, side x side map)."""
    a = logits[:, :, :, 1:, 1:].permute(0, 1, 3, 2, 4)  # L B N H d
    a = a.reshape(a.shape[0], -1, a.shape[3], a.shape[4])
    a = a - a.min(-1, keepdim=True)[0]
    a = a / (a.max(-1, keepdim=True)[0] + 1e-8)
    m = a.reshape(*a.shape[:3], side, side)
    mu = m.mean([-2, -1])
    mu12 = mu.unsqueeze(2) * mu.unsqueeze(3)
    sig = (m * m).mean([-2, -1]) - mu**2
    s12 = (m.unsqueeze(2) * m.unsqueeze(3)).mean([-2, -1]) - mu12
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu12 + c1) * (2 * s12 + c2)) / (
        (mu.pow(2).unsqueeze(2) + mu.pow(2).unsqueeze(3) + c1) * (sig.unsqueeze(2) + sig.unsqueeze(3) + c2))
    return (1 - ssim**2).mean()


def test_inter_head_loss_equals_released_form_on_any_grid():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 4, 17, 17, generator=g)  # L, B, H, 1 + 4x4 tokens
    ours = inter_head_similarity_loss(list(logits), drop_tokens=1)
    torch.testing.assert_close(ours, _released_inter_head_loss(logits, 4))


def test_identical_heads_give_zero_inter_head_loss():
    one = torch.randn(2, 1, 10, 10)
    logits = one.expand(2, 3, 10, 10).contiguous()
    assert float(inter_head_similarity_loss([logits])) == pytest.approx(0.0, abs=1e-6)
    ssim = inter_head_ssim(logits, drop_tokens=1)
    assert ssim.shape == (2, 9, 3, 3)
    torch.testing.assert_close(ssim, torch.ones_like(ssim))
    # different heads: positive loss; scaling a head's logits does not change it (min-max normalised)
    diff = torch.randn(2, 3, 10, 10)
    scaled = diff.clone()
    scaled[:, 1] = 5 * scaled[:, 1] + 2
    loss = inter_head_similarity_loss([diff])
    assert float(loss) > 0.1
    torch.testing.assert_close(inter_head_similarity_loss([scaled]), loss, rtol=1e-4, atol=1e-5)


def test_total_variation_and_offset_noise_schedule():
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 1.0
    # the centre pixel enters two unit differences in each of the four directions: norm sqrt(2) each
    assert float(total_variation_l2(x)) == pytest.approx(4 * math.sqrt(2), rel=1e-6)
    assert float(total_variation_l2(x, 0.5**0.5)) == pytest.approx(2 * math.sqrt(2) + 2, rel=1e-6)
    assert [offset_noise_remaining(t, 5) for t in range(5)] == [3, 2, 1, 0, 4]


GEN = dict(num_images=6, batch_size=4, iterations=4, num_classes=10, drop_tokens=1, jitter=(1, 2))


def _generation_written_out(model: nn.Module, generator: torch.Generator):
    """MimiQ's generation loop as released (AdamW, cosine to eta_min, roll + offset noise + colour
    shift, L_IH + CE + TV on the un-augmented pixels, clamp), at generate_interhead_images' defaults."""
    lo, hi = SPEC.valid_range()
    its, images, labels = GEN["iterations"], [], []
    with frozen_params(model), AttentionRecorder(model, roles=("qk",)) as rec:
        for bs in (4, 2):
            x = torch.randn(SPEC.shape(bs), generator=generator).requires_grad_(True)
            y = torch.randint(10, (bs,), generator=generator)
            opt = torch.optim.AdamW([x], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-6)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=its, eta_min=1e-3)
            for t in range(its):
                x_aug = roll_jitter(x, 1 if t < its / 2 else 2, generator)
                x_aug = color_shift(offset_noise(x_aug, t, its, 0.5, generator), generator, 1.0, 1.0)
                rec.clear()
                opt.zero_grad()
                out = model(x_aug)
                loss = (inter_head_similarity_loss(rec.outputs["qk"], 1) + 2.5e-5 * total_variation_l2(x)
                        + torch.nn.functional.cross_entropy(out, y))
                loss.backward()
                opt.step()
                sched.step()
                clamp_to_range(x.data, lo, hi)
            images.append(x.detach())
            labels.append(y)
    return torch.cat(images), torch.cat(labels)


def test_generation_equals_the_loop_written_out():
    model = tiny_vit()
    res = generate_interhead_images(model, model, SPEC, generator=torch.Generator().manual_seed(4), **GEN)
    images, labels = _generation_written_out(model, torch.Generator().manual_seed(4))
    assert torch.equal(res.images, images) and torch.equal(res.labels, labels)
    assert res.discarded == 0 and len(res.history) == 2
    assert set(res.history[0]) == {f"{w}_{k}" for w in ("first", "last") for k in ("loss", "ih", "tv", "ce")}
    lo, hi = SPEC.valid_range()
    assert images.min() >= lo.min() and images.max() <= hi.max()
    assert all(p.requires_grad for p in model.parameters())  # frozen only while generating


def test_generation_discards_batches_that_turn_nan():
    model = tiny_vit()
    calls = []

    def forward(x):  # NaN logits at the second step of the second batch
        calls.append(1)
        out = model(x)
        return out * math.nan if len(calls) == GEN["iterations"] + 2 else out

    res = generate_interhead_images(model, forward, SPEC, generator=torch.Generator().manual_seed(4), **GEN)
    assert res.discarded == 1 and res.images.shape[0] == 4 and res.labels.shape == (4,)
    assert len(calls) == GEN["iterations"] + 2  # the NaN batch stopped at once
    full = generate_interhead_images(model, model, SPEC, generator=torch.Generator().manual_seed(4), **GEN)
    assert torch.equal(res.images, full.images[:4])  # the first batch is unaffected
    notes = []
    with pytest.raises(RuntimeError, match="every generated batch"):
        generate_interhead_images(model, lambda x: model(x) * math.nan, SPEC, progress=notes.append,
                                  generator=torch.Generator().manual_seed(4), **GEN)
    assert notes == ["batch 1/2: NaN, discarded", "batch 2/2: NaN, discarded"]


# ------------------------------------------------------------------------------------------------
# Quantizers


def test_first_batch_lsq_init_matches_released_formulas():
    spec = QuantizerSpec(range="lsq", lsq_init="lsq")
    x = torch.tensor([[-0.5, 0.25, 1.0, 2.0]])
    q = FirstBatchLSQQuantizer(spec, 4)
    q(x)
    assert q.signed and q.qrange == (-8, 7)  # min < 1e-5
    s0 = 2 * x.abs().mean() / math.sqrt(7)
    assert float(q.scale.detach()) == pytest.approx(float(s0), rel=1e-6)
    assert float(q.zero_point.detach()) == pytest.approx(0.1 * (-0.5 - float(s0) * 7), rel=1e-5)
    assert q.grad_factor_value == pytest.approx(1 / math.sqrt(4 * 7))
    pos = FirstBatchLSQQuantizer(spec, 4)
    pos(x.abs() + 0.1)
    assert not pos.signed and pos.qrange == (0, 15)


def _reference_lsq(x, s, z, qmin, qmax, g_s, g_z):
    def scale_grad(t, g):
        return (t - t * g).detach() + t * g

    def round_ste(t):
        return (t.round() - t).detach() + t

    s, z = scale_grad(s, g_s), round_ste(scale_grad(z, g_z))
    return (round_ste(torch.clamp(x / s + z, qmin, qmax)) - z) * s


@pytest.mark.parametrize("scale_zp", [False, True])
def test_lsq_gradient_scaling(scale_zp):
    spec = QuantizerSpec(range="lsq", lsq_init="lsq")
    g = torch.Generator().manual_seed(0)
    x0 = 3 * torch.randn(4, 6, 8, generator=g)
    q = FirstBatchLSQQuantizer(spec, 4, g_scale=1.0, scale_zero_point_grad=scale_zp)
    q(x0)  # initialise
    gfac = q.grad_factor_value
    assert gfac == pytest.approx(lsq_grad_scale(x0.numel(), 7))
    x = x0.clone().requires_grad_(True)
    w = torch.randn(x.shape, generator=g)
    (q(x) * w).sum().backward()

    s = q.scale.detach().clone().requires_grad_(True)
    z = q.zero_point.detach().clone().requires_grad_(True)
    xr = x0.clone().requires_grad_(True)
    y = _reference_lsq(xr, s, z, -8, 7, gfac, gfac if scale_zp else 1.0)
    torch.testing.assert_close(q(x0), y.detach())
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(q.scale.grad, s.grad)
    torch.testing.assert_close(q.zero_point.grad, z.grad)
    # the step's gradient is the unscaled LSQ gradient times g
    s1 = q.scale.detach().clone().requires_grad_(True)
    (_reference_lsq(x0, s1, z.detach(), -8, 7, 1.0, 1.0) * w).sum().backward()
    torch.testing.assert_close(q.scale.grad, s1.grad * gfac)


def test_identity_ste_weight_quantizer():
    spec = QuantizerSpec(kind="uniform", symmetric=True, per_channel=True, ch_axis=0, range="dynamic",
                         v1_scale=True)
    w = torch.randn(4, 6)
    base, ours = UniformQuantizer(spec, 4), IdentitySTEUniformQuantizer(spec, 4)
    wg = w.clone().requires_grad_(True)
    out = ours(wg)
    torch.testing.assert_close(out, base(w))
    out.sum().backward()
    torch.testing.assert_close(wg.grad, torch.ones_like(w))  # the channel max (clamped) keeps its gradient
    wm = w.clone().requires_grad_(True)
    base(wm).sum().backward()
    assert float(wm.grad.sum()) < w.numel()  # the masked STE zeroes the clamped maxima


def test_policy_placement_on_vit_and_swin(tmp_path):
    for model, family in ((tiny_vit(), "vit"), (tiny_swin(), "swin")):
        method = mimiq()
        student = method.build(make_target(model, family), parse_bits("w4a4"), make_ctx(tmp_path)).model
        assert first_layer(model) == ("conv", "patch_embed.proj")
        pe = student.patch_embed.proj
        assert isinstance(pe, QuantConv2d) and isinstance(pe.a_quant, nn.Identity)
        assert isinstance(pe.w_quant, IdentitySTEUniformQuantizer) and pe.w_quant.bits == 4
        linears = [m for m in student.modules() if isinstance(m, nn.Linear)]
        assert linears and all(isinstance(m, QuantLinear) for m in linears)
        assert all(isinstance(m.a_quant, FirstBatchLSQQuantizer) for m in linears)
        mms = [m for m in student.modules() if isinstance(m, QuantMatMul)]
        n_attn = sum(1 for m in student.modules() if hasattr(m, "matmul1"))
        assert len(mms) == 2 * n_attn and all(isinstance(m.b_quant, FirstBatchLSQQuantizer) for m in mms)
        assert all(type(m) is Tap for m in student.modules() if isinstance(m, Tap))  # taps stay FP
        head = student.head.fc if family == "swin" else student.head
        assert head.w_quant.bits == 4 and isinstance(head.a_quant, FirstBatchLSQQuantizer)
    assert mimiq_policy(("conv", "patch_embed.proj")).to_dict()["rules"][0]["act"] is None


# ------------------------------------------------------------------------------------------------
# Augmentation, the whole method, determinism, det/seg


def test_batch_augment_deterministic_and_shapes():
    x = torch.randn(4, 3, 24, 24)
    spec = InputSpec((24, 24), 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    outs = [simclr_batch_augment(x, spec, torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert outs[0].shape == x.shape
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_quantize_runs_and_is_deterministic(tmp_path, family):
    make = tiny_vit if family == "vit" else tiny_swin
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    outs = []
    for run in range(2):
        target = make_target(make(), family)
        ctx = make_ctx(tmp_path / str(run))
        out = mimiq().quantize(target, parse_bits("w4a4"), ctx)
        q = out.model
        with torch.no_grad():
            outs.append(q(x))
        assert ctx.timings["generation"] > 0 and ctx.timings["finetune"] > 0
        assert ctx.extra["finetune"]["first_step_epoch"] == 2 and len(ctx.extra["finetune"]["history"]) == 2
        assert out.resolved_bits.layers and out.policy["name"] == "mimiq"
        assert not any(p.requires_grad for p in q.parameters())
    assert torch.equal(outs[0], outs[1])
    with torch.no_grad():
        assert not torch.equal(outs[0], make()(x))  # it is quantized


def test_generation_cache_shared_across_bits(tmp_path):
    method = mimiq()
    ctx = make_ctx(tmp_path, use_cache=True, galleries=True)
    method.quantize(make_target(tiny_vit()), parse_bits("w4a4"), ctx)
    assert (tmp_path / "art" / "mimiq_calibration.png").exists()
    ctx2 = make_ctx(tmp_path, use_cache=True)
    method.quantize(make_target(tiny_vit()), parse_bits("w8a8"), ctx2)
    assert any("loaded from cache" in n for n in ctx2.notes)
    assert ctx2.image_hashes == ctx.image_hashes


def test_without_logits_uses_features_and_notes(tmp_path):
    ctx = make_ctx(tmp_path)
    q = mimiq().quantize(make_target(tiny_vit(), logits=False), parse_bits("w4a4"), ctx).model
    assert any("no class logits" in n and "CE" in n for n in ctx.notes)
    assert any("stage features" in n for n in ctx.notes)
    assert "first_ce" not in ctx.extra["generation"]["loss_first_batch"]  # no CE part was logged
    assert ctx.extra["finetune"]["teacher_agreement_synthetic"] is None
    assert isinstance(q.blocks[0].attn.qkv, QuantLinear)


def test_max_total_pixels_caps_the_synthetic_set(tmp_path):
    ctx = make_ctx(tmp_path)
    method = mimiq(num_images=8, gen_batch_size=8, batch_size=8, max_total_pixels=3 * 16 * 16)
    method.quantize(make_target(tiny_vit()), parse_bits("w4a4"), ctx)
    assert ctx.extra["generation"]["images"] == 3 and ctx.extra["finetune"]["batch_size"] == 3
    assert any("caps the synthetic set at 3 images" in n for n in ctx.notes)
    assert method.config.num_images == 8  # the method's own config is left as it was


@pytest.mark.parametrize("scale", [0.0, 100.0])
def test_quantizer_lr_scale(tmp_path, monkeypatch, scale):
    init = FirstBatchLSQQuantizer._compute_params

    def remember(self):
        init(self)
        self.initial = (self.scale.detach().clone(), self.zero_point.detach().clone())

    monkeypatch.setattr(FirstBatchLSQQuantizer, "_compute_params", remember)
    target = make_target(tiny_vit())
    method = mimiq(quantizer_lr_scale=scale, lr=1e-2)
    q = method.quantize(target, parse_bits("w4a4"), make_ctx(tmp_path)).model
    lsq = [m for m in q.modules() if isinstance(m, FirstBatchLSQQuantizer)]
    moved = [not torch.equal(m.scale.detach(), m.initial[0]) for m in lsq]
    assert all(moved) if scale else not any(moved)
    assert not torch.equal(q.blocks[0].attn.qkv.weight, target.model.blocks[0].attn.qkv.weight)
