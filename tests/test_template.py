"""The method template: hook order, the harness's fp path, data sources swapped by one config field."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import make_ctx, make_target, tiny_vit

from bench import api
from methods.base import METHODS, QuantMethod, register_method
from methods.data import SOURCES
from methods.quant.bits import parse_bits
from methods.quant.policy import Policy, Rule
from methods.quant.quantizers import QuantizerSpec

W = QuantizerSpec(symmetric=True, per_channel=True, ch_axis=0)


@dataclasses.dataclass
class SpyConfig:
    num_images: int = 4
    data_source: str | None = None


class Spy(QuantMethod):
    """Records the order the driver calls the hooks in."""

    data_free = True
    data_source = "noise"
    calls: list[str] = []

    def target_config(self, target, ctx):
        self.calls.append("target_config")
        return self.config

    def calibration_data(self, target, ctx):
        self.calls.append("calibration_data")
        return super().calibration_data(target, ctx)

    def policy(self, target):
        self.calls.append("policy")
        return Policy("spy", [Rule(kind="linear", weight=W)])

    def calibrate(self, built, images, target, ctx):
        self.calls.append("calibrate")
        super().calibrate(built, images, target, ctx)

    def finetune(self, built, images, target, bits, ctx):
        self.calls.append("finetune")


def test_hooks_run_in_reading_order(tmp_path):
    with METHODS.scoped():
        register_method("spy", config=SpyConfig, provenance={"x": "choice: test"})(Spy)
        Spy.calls = []
        out = Spy().quantize(make_target(tiny_vit()), parse_bits("w8a8"), make_ctx(tmp_path))
    assert Spy.calls == ["target_config", "calibration_data", "policy", "calibrate", "finetune"]
    assert out.policy["name"] == "spy" and out.resolved_bits.layers["blocks.0.mlp.fc1"] == (8, None)


def test_psaq_vit_images_through_mimiq_finetuning(tmp_path):
    """``data_source=psaq-vit`` on mimiq: PSAQ-ViT's generator (at its own ci settings) makes the images,
    MimiQ fine-tunes on them; the same images as psaq-vit itself makes for this target and seed."""
    mimiq = METHODS.get("mimiq")
    cfg = mimiq.make_config("ci", data_source="psaq-vit", gen_iterations=2, epochs=3, num_images=8,
                            batch_size=4, lr_steps=(2,))
    target = make_target(tiny_vit())
    ctx = make_ctx(tmp_path)
    out = mimiq(cfg).quantize(target, parse_bits("w4a4"), ctx)
    assert ctx.data_sources["calibration"]["source"] == "psaq-vit"
    assert ctx.data_sources["calibration"]["images"] == 32  # psaq-vit's own batch size decides
    assert any("data source 'psaq-vit'" in n for n in ctx.notes)
    assert out.policy["name"] == "mimiq" and ctx.extra["finetune"]["epochs"] == 3
    psaq = METHODS.get("psaq-vit")
    ref = make_ctx(tmp_path / "ref")
    images = psaq(psaq.make_config("ci")).calibration_data(target, ref)
    assert ref.image_hashes["calibration"] == ctx.image_hashes["calibration"]
    assert images.shape[0] == 32


def test_real_images_for_a_data_free_method_are_noted(tmp_path):
    noise = METHODS.get("noise-ptq")
    real = torch.randn(32, 1, 16, 16)
    ctx = make_ctx(tmp_path, real=real)
    method = noise(noise.make_config("ci", data_source="real"))
    method.quantize(make_target(tiny_vit()), parse_bits("w8a8"), ctx)
    assert ctx.data_sources["calibration"]["source"] == "real"
    assert any("not data-free" in n for n in ctx.notes)


def test_unknown_data_source_fails_before_any_job():
    with pytest.raises(api.UsageError, match="unknown data source 'psaq_vit'.*did you mean 'psaq-vit'"):
        api.make_plan(methods=["mimiq"], method_args="data_source=psaq_vit")
    assert {"real", "noise", "psaq-vit", "psaq-vit-v2", "mimiq"} <= set(SOURCES.names())
