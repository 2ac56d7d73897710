"""Tiny models, targets and run contexts shared by the method tests (the fixtures in conftest.py
hand these out; modules that build models inside helpers import them directly)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from methods.base import RunContext
from methods.quant.surgery import prepare
from methods.quant.target import InputSpec, QuantTarget

SPEC = InputSpec(image_size=(16, 16), in_chans=1, mean=(0.5,), std=(0.5,))


def tiny_vit(seed: int = 0, head_scale: float = 1.0) -> nn.Module:
    """A prepared 2-block ViT on 1x16x16 inputs (4x4 patches + class token), 10 classes.
    ``head_scale`` > 1 gives confident logits, as a trained classifier has (random init gives ~0)."""
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                          num_heads=2, mlp_ratio=2.0)
    if head_scale != 1.0:
        with torch.no_grad():
            m.head.weight.mul_(head_scale)
    return prepare(m.eval())


def tiny_swin(seed: int = 0) -> nn.Module:
    """A prepared 2-stage Swin on 1x16x16 inputs (2x2 patches, 4x4 windows), 10 classes."""
    torch.manual_seed(seed)
    m = SwinTransformer(img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depths=(2, 2),
                        num_heads=(2, 2), window_size=4, mlp_ratio=2.0)
    return prepare(m.eval())


def make_target(model: nn.Module, family: str = "vit", logits: bool = True) -> QuantTarget:
    """The classification target of a tiny model; ``logits=False`` mimics det/seg (features only)."""
    return QuantTarget(
        model=model, model_name=f"tiny-{family}", quant_path="", input_spec=SPEC, family=family,
        logits=(lambda m, x: m(x)) if logits else None,
        features=None if logits else (lambda m, x: [m.forward_features(x)]),
        num_classes=10 if logits else None,
    )


def no_real_images(n: int) -> torch.Tensor:
    raise AssertionError("a data-free method asked for real calibration images")


def make_ctx(tmp_path: Path, seed: int = 0, real: torch.Tensor | Callable | None = None,
             use_cache: bool = False, galleries: bool = False) -> RunContext:
    """A CPU run context under ``tmp_path``; ``real`` (a batch, sliced to n) backs the "real" source,
    else asking for real images fails the test."""
    if real is None:
        real_images = no_real_images
    elif callable(real):
        real_images = real
    else:
        real_images = lambda n: real[:n]  # noqa: E731
    return RunContext(device=torch.device("cpu"), seed=seed, profile="ci", cache_dir=tmp_path / "cache",
                      artifacts_dir=tmp_path / "art", real_images=real_images, use_cache=use_cache,
                      galleries=galleries, log=logging.getLogger("test"))
