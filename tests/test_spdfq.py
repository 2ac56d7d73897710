"""SPDFQ: the RepQ-ViT fold, reconstruction units, the method end to end, data sources, mm Swin sites."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import SPEC, make_ctx, make_target, tiny_swin, tiny_vit

from methods.base import METHODS
from methods.data import SOURCES
from methods.quant.bits import parse_bits
from methods.quant.policy import apply_policy, calibrate, quantizers, set_mode
from methods.quant.quantizers import UniformQuantizer
from methods.quant.reconstruct import block_units
from methods.spdfq import fold_sites, spdfq_policy
from methods.synth.artifacts import tensor_sha256

torch.set_num_threads(1)
TINY = dict(num_images=4, iterations=3, warmup=1, recon_iterations=2)


def _x(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(SPEC.shape(n), generator=torch.Generator().manual_seed(seed))


def _calibrated(model, bits: str = "w4a4"):
    apply_policy(model, spdfq_policy(), parse_bits(bits))
    calibrate(model, [_x()], weights_quantized=True)
    return model


def test_fold_sites_and_units_of_timm_models():
    vit, swin = _calibrated(tiny_vit()), _calibrated(tiny_swin())
    assert fold_sites(vit) == [(f"blocks.{i}.{n}", f"blocks.{i}.{l}") for i in (0, 1)
                               for n, l in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"))]
    assert len(fold_sites(swin)) == 9  # 4 blocks x 2 + the patch merging's norm -> reduction
    assert block_units(vit) == ["patch_embed", "blocks.0", "blocks.1", "head"]
    assert block_units(swin) == [
        "patch_embed", "layers.0.blocks.0", "layers.0.blocks.1", "layers.1.downsample",
        "layers.1.blocks.0", "layers.1.blocks.1", "head",
    ]


def test_reparameterization_is_exact_in_fp_and_for_the_activation_quantizers():
    """With every quantizer off the folded model gives the FP outputs within 1e-5; with the activation
    quantizers on (weights FP) the per-tensor quantizer on the folded norm gives, through the layer,
    what the channel-wise one gave; the deployed quantizer is per-tensor with s = mean(s_c)."""
    from methods.quant.reparam import reparameterize_post_norm

    model = _calibrated(tiny_vit())
    x = _x(4, seed=7)
    weights = [q for q in quantizers(model) if q.is_weight]
    layer = model.blocks[0].attn.qkv
    s_c = layer.a_quant.scale.clone()
    with torch.no_grad():
        set_mode(model, "off")
        fp = model(x)
        set_mode(model, "quant")
        for q in weights:
            q.mode = "off"
        act_only = model(x)
        for norm, lin in fold_sites(model):
            reparameterize_post_norm(model.get_submodule(norm), model.get_submodule(lin))
        act_only_folded = model(x)
        set_mode(model, "off")
        fp_folded = model(x)
    torch.testing.assert_close(fp_folded, fp, rtol=0, atol=1e-5)
    torch.testing.assert_close(act_only_folded, act_only, rtol=0, atol=1e-4)
    assert not torch.equal(act_only, fp)  # the activation quantizers did act
    aq = layer.a_quant
    assert isinstance(aq, UniformQuantizer) and not aq.spec.per_channel
    assert aq.scale.item() == pytest.approx(s_c.mean().item(), rel=1e-6)
    assert all(q.mode == "off" for q in weights)  # modes kept


def _run(model, family="vit", seed=0, logits=True, tmp_path=None, **over):
    spdfq = METHODS.get("spdfq")
    cfg = spdfq.make_config("ci", **{**TINY, **over})
    ctx = make_ctx(tmp_path, seed=seed, real=_x(8, seed=3))
    target = make_target(model, family, logits=logits)
    result = spdfq(cfg).quantize(target, parse_bits("w4a4"), ctx)
    return result, ctx, target


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_spdfq_runs_folds_reconstructs_and_is_deterministic(family, tmp_path):
    build = tiny_vit if family == "vit" else tiny_swin
    a, ctx_a, target = _run(build(), family, tmp_path=tmp_path / "a")
    b, ctx_b, _ = _run(build(), family, tmp_path=tmp_path / "b")
    x = _x(5, seed=11)
    with torch.no_grad():
        ya, yb, fp = a.model(x), b.model(x), target.model(x)
    assert torch.equal(ya, yb)
    assert ctx_a.image_hashes == ctx_b.image_hashes
    assert ctx_a.data_sources["calibration"]["source"] == "spdfq"
    assert not torch.equal(ya, fp)  # quantized
    assert ctx_a.extra["reparameterization"]["folded"] == (4 if family == "vit" else 9)
    assert ctx_a.extra["reparameterization"]["fp_relative_error"] < 1e-5
    units = ctx_a.extra["reconstruction"]["units"]
    assert [u["block"] for u in units] == block_units(a.model)
    assert sum(u["mse_after"] for u in units) < sum(u["mse_before"] for u in units)
    c, ctx_c, _ = _run(build(), family, seed=1, tmp_path=tmp_path / "c")
    assert ctx_c.image_hashes != ctx_a.image_hashes


def test_data_source_noise_feeds_noise_through_the_pipeline(tmp_path):
    """``data_source=noise``: the calibration images are exactly the job seed's N(0, 1) batch."""
    _, ctx, _ = _run(tiny_vit(), tmp_path=tmp_path, data_source="noise")
    expected = torch.randn(SPEC.shape(TINY["num_images"]), generator=make_ctx(tmp_path).generator())
    assert ctx.data_sources["calibration"]["source"] == "noise"
    assert ctx.image_hashes["calibration"] == tensor_sha256(expected)
    _, own, _ = _run(tiny_vit(), tmp_path=tmp_path / "own")
    assert own.image_hashes["calibration"] != ctx.image_hashes["calibration"]


def test_data_source_real_and_other_generators(tmp_path):
    _, real, _ = _run(tiny_vit(), tmp_path=tmp_path / "r", data_source="real")
    assert real.image_hashes["calibration"] == tensor_sha256(_x(8, seed=3)[:TINY["num_images"]])
    assert any("not data-free" in n for n in real.notes)
    _, psaq, _ = _run(tiny_vit(), tmp_path=tmp_path / "p", data_source="psaq-vit")
    assert psaq.data_sources["calibration"] == {"source": "psaq-vit", "images": 32, "data_free": True,
                                                "cached": False}
    assert "spdfq" in SOURCES.names()


def test_without_logits_generation_is_apa_and_tv_only(tmp_path):
    result, ctx, _ = _run(tiny_swin(), "swin", logits=False, tmp_path=tmp_path)
    gen = ctx.extra["generation"]
    assert gen["msr"] is False and gen["soft_labels"] is False and gen["apa"] is True
    assert any("no class logits" in n for n in ctx.notes)


def test_ablation_switches_change_the_images(tmp_path):
    hashes = set()
    for i, flags in enumerate([dict(), dict(use_apa=False), dict(use_msr=False), dict(use_sl=False)]):
        _, ctx, _ = _run(tiny_vit(), tmp_path=tmp_path / str(i), reconstruct=False, **flags)
        hashes.add(ctx.image_hashes["calibration"])
    assert len(hashes) == 4


def test_mm_swin_sites_cover_the_padded_window_grid():
    pytest.importorskip("mmdet")
    from test_surgery_mm import random_model

    from methods.quant.surgery import AttentionRecorder
    from methods.quant.surgery_mm import prepare_mm
    from methods.synth.spdfq_generation import attention_maps, attention_sites

    model, _ = random_model("mask-rcnn")
    backbone = prepare_mm(model.backbone)
    x = torch.randn(2, 3, 120, 120, generator=torch.Generator().manual_seed(0))  # 30x30 tokens, window 4
    with AttentionRecorder(backbone, roles=("av",), keep_inputs=True) as rec:
        sites = attention_sites(backbone, rec, "swin", None, probe=lambda: backbone(x))
        with torch.no_grad():
            rec.clear()
            backbone(x)
        maps = attention_maps([rec.inputs["av"][s.depth - 1][0] for s in sites], sites, 0)
    assert [s.grid for s in sites][:2] == [(32, 32), (32, 32)]  # 30 padded to whole windows of 4
    assert [s.shift for s in sites][:2] == [0, 2]
    for site, m in zip(sites, maps, strict=True):
        windows = (site.grid[0] // site.window) * (site.grid[1] // site.window)
        assert m.shape[-1] == site.grid[0] * site.grid[1]
        # each window's query-mean row sums to 1 over its keys
        torch.testing.assert_close(m.sum(-1), torch.full(m.shape[:2], float(windows)), rtol=1e-5, atol=1e-4)


def test_ci_profile_and_config_fields():
    spdfq = METHODS.get("spdfq")
    cfg = spdfq.make_config("ci")
    assert cfg.recon_lr == 4e-5 and cfg.num_images == 32 and cfg.tv_weight == 0.05
    names = {f.name for f in dataclasses.fields(cfg)}
    assert {"use_apa", "use_msr", "use_sl", "data_source", "apa_weight"} <= names
