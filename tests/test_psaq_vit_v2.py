"""PSAQ-ViT V2 on tiny timm models: the adversarial and student steps, determinism, no labels, dense path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from tiny import SPEC, make_ctx, make_target
from tiny import tiny_vit as _tiny_vit
from torch import nn

from methods.base import get_method
from methods.psaq_vit_v2 import PSAQViTV2, TeacherStudent, generate, model_forward
from methods.quant.bits import parse_bits
from methods.quant.distill import kl_logits
from methods.quant.surgery import prepare
from methods.quant.target import QuantTarget
from methods.synth.optimize import Stage
from tasks.mini import fashion

torch.set_num_threads(1)
# a few seconds per run: 2 init stages of 4 steps, 3 rounds of 3 pixel + 4 student steps
TINY = dict(batch_size=8, init_iterations=4, init_warmup=1, rounds=3, gen_steps=3, student_steps=4,
            student_lr_w4=1e-3, student_lr_w8=1e-3)


def tiny_vit(seed: int = 0) -> nn.Module:
    return _tiny_vit(seed, head_scale=40.0)  # confident logits, as a trained classifier has


def student(m: PSAQViTV2, target: QuantTarget, bits: str, ctx, kind: str,
            calib: torch.Tensor) -> TeacherStudent:
    """The template's build + calibrate, and the teacher-student pair the rounds work on."""
    built = m.build(target, parse_bits(bits), ctx)
    m.calibrate(built, calib, target, ctx)
    return TeacherStudent(model_forward(target, target.model, kind),
                          model_forward(target, built.model, kind), m.discrepancy(kind), built.model,
                          built.qmodule)


def method(**over) -> PSAQViTV2:
    cls = get_method("psaq-vit-v2")
    return cls(cls.make_config("ci", **{**TINY, **over}))


def images(seed: int, n: int = 8) -> torch.Tensor:
    return torch.randn(SPEC.shape(n), generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def discrepancy(ts, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(ts.discrepancy(ts.student_fn(x), ts.teacher_fn(x)))


# ------------------------------------------------------------------------------------------------
# the two halves of a round


def test_adversarial_sample_step_raises_the_discrepancy(tmp_path):
    """W4A8: the STE passes activation rounding as identity, so ∂D/∂x sees the weight error (large at
    W4) but not the activation error; at 8-bit activations the ascent direction is informative."""
    target = make_target(tiny_vit())
    ctx = make_ctx(tmp_path)
    x0 = images(0)
    out = {}
    for adv in (0.0, 3.0):
        m = method(adv_weight=adv)
        ts = student(m, target, "w4a8", ctx, "kl", x0)
        d0 = discrepancy(ts, x0)
        x, hist = generate(m.config, target, ctx, ts.teacher_fn, [Stage(15, 1, 0, 0.2)],
                           torch.Generator().manual_seed(1), x0, ts)
        out[adv] = (d0, discrepancy(ts, x), hist)
    d0, d_adv, hist = out[3.0]
    d_plain = out[0.0][1]
    assert d0 > 1e-3
    assert d_adv > 3 * d0  # the images moved to where the student disagrees more (0.045 -> 0.45)
    assert d_adv > 2 * d_plain  # and that is the adversarial term's doing, not PSE / TV (0.16)
    assert "adv" in hist[0] and "adv" not in out[0.0][2][0]
    assert max(h["adv"] for h in hist[-3:]) > hist[0]["adv"]


def test_student_step_lowers_the_discrepancy(tmp_path):
    target = make_target(tiny_vit())
    ctx = make_ctx(tmp_path)
    x = images(2)
    m = method(gen_steps=0, warm_noise=0.0, student_augment=False, rounds=4, student_steps=10)
    ts = student(m, target, "w4a8", ctx, "kl", x)
    before = discrepancy(ts, x)
    teacher_state = {k: v.clone() for k, v in target.model.state_dict().items()}
    m.adapt(ts, target, parse_bits("w4a8"), ctx, x)
    after = discrepancy(ts, x)
    assert before > 1e-2 and after < 0.5 * before  # 0.063 -> 0.009
    rounds = ctx.extra["psaq_v2"]["rounds"]
    assert rounds[-1]["kd_last"] < rounds[0]["kd_first"]
    for k, v in target.model.state_dict().items():  # the teacher is never trained
        assert torch.equal(v, teacher_state[k])


# ------------------------------------------------------------------------------------------------
# end to end: determinism, cache, gallery, bit specs


def test_same_seed_bit_identical_and_cache(tmp_path):
    target = make_target(tiny_vit())
    x = images(9, 16)
    outs = []
    for run, use_cache in enumerate((False, False, True, True)):
        ctx = make_ctx(tmp_path / ("cached" if use_cache else f"run{run}"), seed=3, use_cache=use_cache,
                       galleries=True)
        q = method().quantize(target, parse_bits("w4a8"), ctx).model
        with torch.no_grad():
            outs.append(q(x))
        if use_cache:
            hit = any("loaded from cache" in n for n in ctx.notes)
            assert hit == (run == 3)  # the second cached run loads the initial batch
    for o in outs[1:]:
        assert torch.equal(o, outs[0])  # bit-identical: fresh, fresh, cache miss, cache hit
    art = tmp_path / "cached" / "art"
    assert (art / "psaq-vit-v2_final_round.png").exists() and (art / "psaq-vit-v2_calibration.png").exists()
    assert len(list((tmp_path / "cached" / "cache").glob("psaq-vit-v2-tiny-vit-*.pt"))) == 1
    other = method().quantize(target, parse_bits("w4a8"), make_ctx(tmp_path / "s4", seed=4)).model
    with torch.no_grad():
        assert not torch.equal(other(x), outs[0])


@pytest.mark.parametrize("bits", ["w4a4", "w6a6", "w8a8", "w4a8"])
def test_bit_specs_run_and_record(tmp_path, bits):
    target = make_target(tiny_vit())
    ctx = make_ctx(tmp_path)
    m = method(rounds=1)
    out = m.quantize(target, parse_bits(bits), ctx)
    q = out.model
    w, a = int(bits[1]), int(bits[3])
    assert out.resolved_bits.layers["blocks.0.attn.qkv"] == (w, a)
    assert out.policy["name"] == "psaq-vit-v1"
    info = ctx.extra["psaq_v2"]
    assert info["discrepancy"] == "kl" and info["student_lr"] == pytest.approx(m.student_lr(parse_bits(bits)))
    assert {"generation", "calibration", "finetune"} <= set(ctx.timings)
    with torch.no_grad():
        assert torch.isfinite(q(images(5))).all()


def test_student_lr_rule_and_profiles(tmp_path):
    cls = get_method("psaq-vit-v2")
    paper = cls.make_config("paper")
    assert (paper.batch_size, paper.rounds, paper.gen_steps, paper.student_steps) == (32, 500, 50, 10)
    assert (paper.adv_weight, paper.temperature, paper.l2_weight, paper.tv_form) == (1.0, 1.0, 0.0, "v1")
    m = cls(paper)
    assert m.student_lr(parse_bits("w8a8")) == pytest.approx(1e-5)
    assert m.student_lr(parse_bits("w4a8")) == pytest.approx(5e-5)
    assert m.student_lr(parse_bits("w6a6")) == pytest.approx((1e-5 * 5e-5) ** 0.5)
    assert cls(dataclasses.replace(paper, student_lr=3e-4)).student_lr(parse_bits("w4a4")) == 3e-4
    ci = cls.make_config("ci")
    assert ci.rounds < paper.rounds and ci.init_iterations < paper.init_iterations
    with pytest.raises(ValueError, match="tv_form"):
        cls(dataclasses.replace(paper, tv_form="l1")).quantize(make_target(tiny_vit()), parse_bits("w8a8"),
                                                               make_ctx(tmp_path))


# ------------------------------------------------------------------------------------------------
# no labels


def _permute_classes(model: nn.Module, perm: torch.Tensor) -> nn.Module:
    """The same classifier with its output units reordered: logits'[:, i] = logits[:, perm[i]]."""
    with torch.no_grad():
        model.head.weight.copy_(model.head.weight[perm])
        model.head.bias.copy_(model.head.bias[perm])
    return model


def _equivariance_error(tmp_path, m: PSAQViTV2) -> float:
    """Quantize a classifier and the same classifier with permuted classes (same seed): a method that
    uses no label gives students that differ by exactly that permutation. A label of any kind (random
    category targets, dataset labels, a fixed class) names a class *index*, which now means another
    class, and breaks it. Bit-exact only for a short run: from the second Adam step on, float
    summation order over the permuted classes flips roundings and the two runs drift apart (~5%)."""
    perm = torch.tensor([3, 7, 0, 9, 1, 5, 8, 2, 6, 4])
    x = images(11, 32)
    q_a = m.quantize(make_target(tiny_vit()), parse_bits("w8a8"), make_ctx(tmp_path / "a")).model
    q_b = m.quantize(make_target(_permute_classes(tiny_vit(), perm)), parse_bits("w8a8"),
                     make_ctx(tmp_path / "b", seed=0)).model
    with torch.no_grad():
        a, b = q_a(x), q_b(x)
    return float((b - a[:, perm]).abs().max() / a.abs().max())


class _LabelledV2(PSAQViTV2):
    """A mutant with a small cross-entropy term to fixed class labels in the student step, computed
    by hand (so only the equivariance check, not the spies below, can see it)."""

    def discrepancy(self, kind):
        labels = torch.arange(TINY["batch_size"]) % 10

        def d(s, t):
            ce = -s.log_softmax(-1)[torch.arange(s.shape[0]), labels[: s.shape[0]]].mean()
            return kl_logits(s, t) + 0.01 * ce

        return d


def test_no_label_enters_the_loss(tmp_path, monkeypatch):
    cls = get_method("psaq-vit-v2")
    # one round: initial batch, calibration, 3 adversarial pixel steps, one student step
    short = cls.make_config("ci", **{**TINY, "rounds": 1, "gen_steps": 3, "student_steps": 1})
    assert _equivariance_error(tmp_path / "clean", PSAQViTV2(short)) == 0.0
    assert _equivariance_error(tmp_path / "mutant", _LabelledV2(short)) > 1e-3  # the check has teeth

    def forbidden(*args, **kwargs):
        raise AssertionError("a label loss or the task's data was used")

    # a whole multi-round run calls no library label loss (the V1 generator's CE to random labels
    # included) and touches no dataset: ctx.real_images raises, and so does loading the mini data
    for name in ("cross_entropy", "nll_loss", "one_hot"):
        monkeypatch.setattr(F, name, forbidden)
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", forbidden)
    monkeypatch.setattr(fashion, "load_mini", forbidden)
    ctx = make_ctx(tmp_path / "spy")
    full = dataclasses.replace(short, rounds=3, gen_steps=3, student_steps=4)
    PSAQViTV2(full).quantize(make_target(tiny_vit()), parse_bits("w4a8"), ctx)
    rounds = ctx.extra["psaq_v2"]["rounds"]
    assert len(rounds) == 3 and not any("ce" in k for r in rounds for k in r)


# ------------------------------------------------------------------------------------------------
# the dense (det/seg) path: backbone features only


class Dense(nn.Module):
    """A stand-in detector: a Swin backbone returning its stage outputs and a head on top."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = prepare(SwinTransformer(img_size=16, patch_size=2, in_chans=1, num_classes=0,
                                                embed_dim=16, depths=(2, 2), num_heads=(2, 2),
                                                window_size=4, mlp_ratio=2.0).eval())
        self.head = nn.Conv2d(32, 3, 1)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.backbone.patch_embed(x)
        out = []
        for layer in self.backbone.layers:
            x = layer(x)
            out.append(x.permute(0, 3, 1, 2))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x)[-1])


def test_dense_path_distils_backbone_features(tmp_path):
    model = Dense().eval()
    target = QuantTarget(model=model, model_name="tiny-dense", quant_path="backbone", input_spec=SPEC,
                         family="swin", logits=None, features=lambda m, x: m.stages(x))
    ctx = make_ctx(tmp_path)
    m = method(dense_batch_size=4, dense_rounds=2, dense_init_iterations=2)
    dense = m.target_config(target, ctx)  # det/seg settings replace the cls ones
    assert (dense.batch_size, dense.rounds, dense.init_iterations, dense.init_warmup) == (4, 2, 2, 0)
    assert m.target_config(make_target(tiny_vit()), ctx) is m.config
    out = m.quantize(target, parse_bits("w4a4"), ctx)
    q = out.model
    assert len(ctx.extra["psaq_v2"]["rounds"]) == 2
    assert ctx.extra["psaq_v2"]["discrepancy"] == "features"
    assert any("task-independent" in n for n in ctx.notes)
    assert out.resolved_bits.layers["layers.0.blocks.0.attn.qkv"] == (4, 4)  # paths below the backbone
    assert not any(k.startswith("head") for k in out.resolved_bits.layers)
    assert torch.equal(q.head.weight, model.head.weight)  # the head stays FP and untrained
    qkv = "layers.0.blocks.0.attn.qkv.weight"
    assert not torch.equal(q.backbone.get_parameter(qkv), model.backbone.get_parameter(qkv))  # trained
    rounds = ctx.extra["psaq_v2"]["rounds"]
    assert all(r["gen_adv_first"] >= 0 and r["kd_first"] >= 0 for r in rounds)
    with torch.no_grad():
        assert torch.isfinite(q(images(1))).all()
