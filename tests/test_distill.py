"""methods.quant.distill: discrepancies, parameter selection, schedule and the student step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from methods.quant.bits import parse_bits
from methods.quant.distill import (
    distillation_loss,
    feature_nmse,
    kl_logits,
    make_student_optimizer,
    student_parameters,
    student_step,
)
from methods.quant.modules import QuantLinear
from methods.quant.policy import Policy, Rule, apply_policy, calibrate
from methods.quant.quantizers import QuantizerSpec, make_quantizer

torch.set_num_threads(1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# discrepancies


def test_kl_logits_matches_definition():
    t = torch.randn(5, 7, generator=_gen(0))
    s = torch.randn(5, 7, generator=_gen(1))
    p = t.softmax(-1)
    expected = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean()  # KL(teacher || student), batch mean
    torch.testing.assert_close(kl_logits(s, t), expected)
    assert float(kl_logits(t, t)) == pytest.approx(0.0, abs=1e-6)
    # temperature: softened distributions, times tau^2 unless disabled
    tau = 3.0
    pt, ls = (t / tau).softmax(-1), (s / tau).log_softmax(-1)
    soft = (pt * (pt.log() - ls)).sum(-1).mean()
    torch.testing.assert_close(kl_logits(s, t, tau), soft * tau**2)
    torch.testing.assert_close(kl_logits(s, t, tau, scale_t2=False), soft)
    # leading positions count as samples (e.g. per-pixel logits with classes last)
    s4, t4 = s.reshape(5, 1, 7).expand(5, 2, 7), t.reshape(5, 1, 7).expand(5, 2, 7)
    torch.testing.assert_close(kl_logits(s4, t4), expected)
    with pytest.raises(ValueError, match="shapes differ"):
        kl_logits(s, t[:, :6])
    with pytest.raises(ValueError, match="temperature"):
        kl_logits(s, t, 0.0)


def test_feature_nmse_values_and_normalisation():
    t1 = torch.randn(4, 8, 3, 3, generator=_gen(0)) * 5.0
    t2 = torch.randn(4, 16, 2, 2, generator=_gen(1)) * 0.1
    s1, s2 = t1 + 1.0, t2 + 0.1  # error = one teacher unit on stage 1, a tenth of a unit on stage 2
    v1, v2 = t1.var(unbiased=False), t2.var(unbiased=False)
    expected = 1.0 / v1 + 0.01 / v2
    torch.testing.assert_close(feature_nmse([s1, s2], [t1, t2]), expected, rtol=1e-5, atol=0)
    mean = feature_nmse([s1, s2], [t1, t2], reduction="mean")
    torch.testing.assert_close(mean, expected / 2, rtol=1e-5, atol=0)
    # scale-free: scaling teacher and student of one stage together leaves it unchanged
    scaled = feature_nmse([10 * s1], [10 * t1])
    torch.testing.assert_close(scaled, feature_nmse([s1], [t1]), rtol=1e-5, atol=0)
    # predicting the teacher's mean scores exactly 1 per stage
    assert float(feature_nmse([torch.full_like(t1, float(t1.mean()))], [t1])) == pytest.approx(1.0, rel=1e-5)
    assert float(feature_nmse(t1, t1)) == 0.0  # a single tensor is one stage
    with pytest.raises(ValueError, match="number of stages"):
        feature_nmse([s1], [t1, t2])
    with pytest.raises(ValueError, match="stage 0"):
        feature_nmse([s2], [t1])


def test_feature_nmse_variance_is_not_a_gradient_path():
    """Raising the discrepancy must not be possible by shrinking the teacher's spread: d/dt goes
    only through the error term, so it is exactly minus d/ds."""
    t = torch.randn(3, 5, generator=_gen(2)).requires_grad_(True)
    s = torch.randn(3, 5, generator=_gen(3)).requires_grad_(True)
    feature_nmse([s], [t]).backward()
    torch.testing.assert_close(t.grad, -s.grad)


# ------------------------------------------------------------------------------------------------
# parameters and schedule


def test_student_parameters_excludes_quantizer_parameters():
    lin = nn.Linear(4, 3)
    lsq = make_quantizer(QuantizerSpec(range="lsq"), 4)
    q = QuantLinear.from_float(lin, make_quantizer(QuantizerSpec(symmetric=True, range="dynamic"), 4), lsq)
    net = nn.Sequential(q, nn.LayerNorm(3))
    net(torch.randn(2, 4))  # lazy init creates the LSQ step / zero-point parameters
    lsq_params = {id(p) for p in lsq.parameters()}
    assert lsq_params  # the test means something only if the quantizer owns parameters
    got = student_parameters(net)
    assert [id(p) for p in got] == [id(q.weight), id(q.bias), id(net[1].weight), id(net[1].bias)]
    with_q = {id(p) for p in student_parameters(net, include_quantizers=True)}
    assert lsq_params <= with_q


def test_cosine_schedule_values():
    p = nn.Parameter(torch.zeros(1))
    opt, sched = make_student_optimizer([p], 1e-2, total_steps=4)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert lrs == pytest.approx(expected)
    opt, sched = make_student_optimizer([p], 1e-2, total_steps=6, warmup_steps=2)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cosine = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]  # over the 4 steps after warm-up
    assert lrs == pytest.approx([1e-2 * f for f in (0.5, 1.0, *cosine)])
    opt, sched = make_student_optimizer([p], 1e-2, total_steps=4, schedule="constant")
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 1e-2
    with pytest.raises(ValueError, match="schedule"):
        make_student_optimizer([p], 1e-2, 4, schedule="linear")


# ------------------------------------------------------------------------------------------------
# the student step through the STE


def _teacher_student(w_bits: str = "w3a3"):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5)).eval()
    with torch.no_grad():
        teacher[2].weight.mul_(8.0)  # confident logits: a clear KL between teacher and 3-bit student
    student = copy.deepcopy(teacher)
    spec_w = QuantizerSpec(symmetric=True, per_channel=True, range="dynamic")
    policy = Policy("t", [Rule("linear", weight=spec_w, act=QuantizerSpec())])
    apply_policy(student, policy, parse_bits(w_bits))
    x = torch.randn(64, 8, generator=_gen(4))
    calibrate(student, [x])
    return teacher, student, x


def test_student_step_lowers_kl_and_leaves_teacher_and_inputs_alone():
    teacher, student, x = _teacher_student()
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    x0 = x.clone()
    opt, sched = make_student_optimizer(student_parameters(student), 1e-2, total_steps=60)
    with torch.no_grad():
        before = float(distillation_loss(student, teacher, kl_logits, x))
    losses = [student_step(student, teacher, kl_logits, x, opt, sched) for _ in range(60)]
    with torch.no_grad():
        after = float(distillation_loss(student, teacher, kl_logits, x))
    assert losses[0] == pytest.approx(before)
    assert before > 1e-3 and after < 0.5 * before
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_state[k])
    assert all(p.grad is None for p in teacher.parameters())
    assert torch.equal(x, x0) and not x.requires_grad


def test_student_step_gradient_reaches_quantized_weights_through_ste():
    teacher, student, x = _teacher_student()
    w = student[0].weight
    w0 = w.detach().clone()
    opt, _ = make_student_optimizer([w], 1e-3, total_steps=1)
    student_step(student, teacher, kl_logits, x, opt)
    assert w.grad is not None and float(w.grad.abs().sum()) > 0
    assert not torch.equal(w.detach(), w0)


def test_student_step_feature_discrepancy_and_grad_clip():
    teacher, student, x = _teacher_student()

    def feats(m):
        return lambda inp: [m[0](inp), m[2](m[1](m[0](inp)))]

    opt, _ = make_student_optimizer(student_parameters(student), 1e-2, total_steps=40, schedule="constant")
    first = student_step(feats(student), feats(teacher), feature_nmse, x, opt, grad_clip=1e-3)
    for _ in range(40):
        last = student_step(feats(student), feats(teacher), feature_nmse, x, opt, grad_clip=1.0)
    assert last < first
