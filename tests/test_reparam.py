"""LayerNorm reparameterisation (RepQ-ViT / SmoothQuant folding) is exact before quantization."""

from __future__ import annotations

import pytest
import torch
from tiny import SPEC, tiny_swin, tiny_vit
from torch import nn

from methods.quant.reparam import fold_into_layernorm


def _random(c: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return 0.5 + 1.5 * torch.rand(c, generator=g), torch.randn(c, generator=g)


def _fold_everywhere(model: nn.Module, g: torch.Generator) -> int:
    """Fold random ratios and shifts into every (LayerNorm -> Linear) pair of a timm ViT / Swin."""
    pairs = []
    for m in model.modules():
        if hasattr(m, "norm1") and hasattr(m, "attn"):  # a transformer block
            pairs += [(m.norm1, [m.attn.qkv]), (m.norm2, [m.mlp.fc1])]
        if hasattr(m, "reduction") and isinstance(getattr(m, "norm", None), nn.LayerNorm):  # PatchMerging
            pairs.append((m.norm, [m.reduction]))
    for norm, linears in pairs:
        fold_into_layernorm(norm, linears, *_random(norm.normalized_shape[0], g))
    return len(pairs)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_folding_keeps_the_outputs(family):
    model = (tiny_vit() if family == "vit" else tiny_swin()).double()
    x = torch.randn(SPEC.shape(3), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        n = _fold_everywhere(model, torch.Generator().manual_seed(2))
        out = model(x)
    assert n == (4 if family == "vit" else 9)  # 2 blocks x 2 (ViT); 4 blocks x 2 + one PatchMerging (Swin)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_folding_in_float32_within_1e_5_and_changes_the_activations():
    model = tiny_vit()
    x = torch.randn(SPEC.shape(3), generator=torch.Generator().manual_seed(1))
    seen = {}
    model.blocks[0].norm1.register_forward_hook(lambda m, a, out: seen.__setitem__("ln", out.detach()))
    with torch.no_grad():
        ref = model(x)
        before = seen["ln"]
        ratio, shift = _random(32, torch.Generator().manual_seed(3))
        fold_into_layernorm(model.blocks[0].norm1, [model.blocks[0].attn.qkv], ratio, shift)
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(seen["ln"], (before + shift) / ratio, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        fold_into_layernorm(model.blocks[0].norm1, [model.blocks[0].attn.qkv], -ratio)
