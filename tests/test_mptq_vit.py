"""MPTQ-ViT: SQ-b exactness (ViT, DeiT, Swin with patch merging), the method's quantizers and
search, and its own Greedy MP."""

from __future__ import annotations

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from tiny import make_ctx, make_target, tiny_swin, tiny_vit

from methods.base import get_method
from methods.mptq_vit import channel_ranges, mptq_policy, search_sites, sq_b_fold
from methods.quant.bits import parse_bits
from methods.quant.policy import apply_policy, set_mode
from methods.quant.surgery import prepare
from methods.quant.twin_quantizers import TwinGeluQuantizer, TwinSoftmaxQuantizer
from tasks.base import get_task


def tiny_deit():
    torch.manual_seed(0)
    m = VisionTransformerDistilled(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32,
                                   depth=2, num_heads=2, mlp_ratio=2.0)
    return prepare(m.eval())


def _forward(m, x):
    out = m(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("make", [tiny_vit, tiny_deit, tiny_swin])
def test_sq_b_is_exact_and_centres_the_post_norm_channels(make):
    model = make()
    apply_policy(model, mptq_policy(), parse_bits("w4a4"))
    set_mode(model, "off")
    with torch.no_grad():  # non-trivial LayerNorm affines, so the shift and scale matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(16, 1, 16, 16)
    with torch.no_grad():
        before = _forward(model, x)
    info = sq_b_fold(model, model, x, _forward, alpha=0.5)
    with torch.no_grad():
        after = _forward(model, x)
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
    blocks = 4 if make is tiny_swin else 2
    assert sum(p.endswith("attn.qkv") for p in info["pairs"]) == blocks
    assert sum(p.endswith("mlp.fc1") for p in info["pairs"]) == blocks
    assert any(p.endswith("reduction") for p in info["pairs"]) == (make is tiny_swin)
    # after the fold the post-LN inputs are centred per channel: (max + min) / 2 = 0
    layers = [model.get_submodule(p) for p in info["pairs"]]
    for lo, hi in channel_ranges(model, layers, x, _forward):
        assert torch.allclose((hi + lo) / 2, torch.zeros_like(hi), atol=1e-4)


def test_policy_places_the_two_region_quantizers():
    model = tiny_vit()
    apply_policy(model, mptq_policy(), parse_bits("w4a4"))
    assert isinstance(model.blocks[0].mlp.fc2.a_quant, TwinGeluQuantizer)
    assert isinstance(model.blocks[0].attn.matmul2.a_quant, TwinSoftmaxQuantizer)
    qkv = model.blocks[0].attn.qkv
    assert qkv.w_quant.spec.per_channel and qkv.a_quant.spec.symmetric
    assert "blocks.0.tap_res1" not in search_sites(model)
    fq = tiny_vit()
    apply_policy(fq, mptq_policy(fully_quantized=True), parse_bits("w4a4"))
    assert "blocks.0.tap_res1" in search_sites(fq) and "tap_pos" in search_sites(fq)


def test_mptq_w4a4_is_closer_to_fp_than_minmax_on_mini_vit(tmp_path):
    """On the trained mini-vit (its calibration split; held-out calibration images as the check, never
    the evaluation set), MPTQ-ViT's W4A4 logits are closer to FP than min-max PTQ's."""
    task = get_task("cls")
    handle = task.load("mini-vit", "mini")
    target = handle.target
    images = task.calibration(handle, 96, seed=0)
    calib, held_out = images[:32], images[32:]
    with torch.no_grad():
        fp = target.logits(target.model, held_out).log_softmax(-1)
    kl = {}
    for name in ("mptq-vit", "minmax-ptq"):
        ctx = make_ctx(tmp_path / name, real=calib)
        cls = get_method(name)
        res = cls(cls.make_config("ci")).quantize(target, parse_bits("w4a4"), ctx)
        with torch.no_grad():
            q = target.logits(res.model, held_out).log_softmax(-1)
        kl[name] = float(torch.nn.functional.kl_div(q, fp, log_target=True, reduction="batchmean"))
        if name == "mptq-vit":
            assert ctx.extra["sq_b"]["fp_relative_error"] < 1e-5
            assert ctx.extra["search"]["sites"] == ctx.extra["search"]["searches"] == 26
            ks = [m.k for m in res.model.modules() if isinstance(m, TwinGeluQuantizer)]
            assert len(ks) == 4 and all(k is not None for k in ks)  # OPT-m chose a ratio per layer
    assert kl["mptq-vit"] < kl["minmax-ptq"]


def test_greedy_mp_is_mptq_own_and_meets_the_budget(tmp_path):
    target = make_target(tiny_swin())
    ctx = make_ctx(tmp_path, real=torch.randn(32, 1, 16, 16))
    cls = get_method("mptq-vit")
    res = cls(cls.make_config("ci")).quantize(target, parse_bits("mp5"), ctx)
    mp = ctx.extra["mixed_precision"]
    assert mp["allocator"] == "mptq-vit greedy mp" and mp["candidates"] == [4, 5, 6, 8]
    assert mp["averages"][0] <= 5.0 + 1e-9 and mp["averages"][1] <= 5.0 + 1e-9
    used = {b for wa in res.resolved_bits.layers.values() for b in wa if b is not None}
    assert used <= {4, 5, 6, 8} and len(used) > 1
    assert mp["steps"] > 0 and mp["loss_end"] >= mp["loss_start"] - 1e-9
