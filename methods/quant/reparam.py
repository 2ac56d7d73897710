"""Exact reparameterisation of a LayerNorm and the Linear layers that read its output.

The LayerNorm output x becomes x' = (x + shift) / ratio per channel, by changing the LayerNorm
affine (gamma' = gamma / ratio, beta' = (beta + shift) / ratio); every following Linear absorbs the
inverse (W' = W * ratio over input channels, b' = b - W @ shift), so the network computes the same
function in floating point. RepQ-ViT uses this to turn a channel-wise post-LayerNorm activation
quantizer into a per-tensor one (ratio = s_c / mean(s), shift from the zero points); SmoothQuant-
style scaling (MPTQ-ViT's SQ-b) is the shift-free, per-channel-scale case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from methods.quant.modules import QuantLinear
from methods.quant.quantizers import UniformQuantizer

# (norm, layer) children of one parent where the layer reads the norm's output and nothing else: timm
# norm1 -> attn.qkv, norm2 -> mlp.fc1, PatchMerging norm -> reduction; mmcv FFN norm2 -> ffn.layers.0.0.
# mmdet/mmseg Swin's norm1 -> attn.w_msa.qkv is left out: ShiftWindowMSA zero-pads the LayerNorm
# output to whole windows, and a folded shift would move those padded tokens.
FOLD_PAIRS = (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"), ("norm2", "ffn.layers.0.0"), ("norm", "reduction"))


def norm_linear_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(LayerNorm path, Linear path) pairs below ``module`` (FOLD_PAIRS) whose fold is exact."""
    pairs = []
    for path, parent in module.named_modules():
        for norm_name, layer_name in FOLD_PAIRS:
            try:
                norm, layer = parent.get_submodule(norm_name), parent.get_submodule(layer_name)
            except AttributeError:
                continue
            if isinstance(norm, nn.LayerNorm) and isinstance(layer, nn.Linear):
                prefix = f"{path}." if path else ""
                pairs.append((prefix + norm_name, prefix + layer_name))
    return pairs


# a fold is exact in real arithmetic; in float32 the outputs may move by rounding only
FOLD_TOLERANCE = 1e-4


def max_relative_error(before: Tensor, after: Tensor) -> float:
    """max |after - before| / max |before|: how far a fold moved a (flattened) FP output."""
    return float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))


@torch.no_grad()
def fold_into_layernorm(norm: nn.LayerNorm, linears: Sequence[nn.Linear], ratio: Tensor,
                        shift: Tensor | None = None) -> None:
    """Rescale and shift ``norm``'s output per channel, compensated in ``linears`` (in place).

    ``ratio`` (C,) must be positive; ``shift`` (C,) defaults to 0. The norm needs an affine.
    """
    if norm.weight is None or norm.bias is None:
        raise ValueError("fold_into_layernorm: the LayerNorm needs elementwise_affine=True with a bias")
    ratio = ratio.to(norm.weight)
    if (ratio <= 0).any():
        raise ValueError("fold_into_layernorm: every ratio must be positive")
    shift = torch.zeros_like(ratio) if shift is None else shift.to(norm.weight)
    for lin in linears:
        if lin.in_features != ratio.numel():
            raise ValueError(f"fold_into_layernorm: {lin} does not read {ratio.numel()} channels")
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                device=lin.weight.device))
        lin.bias.sub_(lin.weight @ shift)  # uses the original W: W (x' * ratio - shift) + b = W x + b
        lin.weight.mul_(ratio)
    norm.weight.div_(ratio)
    norm.bias.add_(shift).div_(ratio)


@torch.no_grad()
def reparameterize_post_norm(norm: nn.LayerNorm, layer: QuantLinear) -> dict[str, Any]:
    """RepQ-ViT's scale reparameterisation of a calibrated channel-wise input quantizer (in place).

    ``layer.a_quant`` is an initialised per-channel asymmetric uniform quantizer over the last axis
    (scales s_c, zero points z_c) of ``norm``'s output. It becomes per-tensor with s = mean(s_c) and
    z = round(mean(z_c)); the LayerNorm affine absorbs ratio = s_c / s and shift = s_c (z_c - z), and
    the layer the inverse, so the per-tensor quantizer on the new LayerNorm output produces, through
    the layer, exactly what the channel-wise one did (z_c - z is an integer: the rounding grid moves
    by whole steps). The weight quantizer is then re-initialised on the rescaled weight. Both
    quantizers keep their modes.
    """
    aq = layer.a_quant
    if not (isinstance(aq, UniformQuantizer) and aq.spec.per_channel and aq.initialized):
        raise ValueError("reparameterize_post_norm: the layer needs a calibrated per-channel input quantizer")
    qmin, qmax = aq.qrange
    s_c, z_c = aq.scale.float(), aq.zero_point.float()
    s = s_c.mean()
    z = z_c.mean().round().clamp(qmin, qmax)
    ratio, shift = s_c / s, s_c * (z_c - z)
    fold_into_layernorm(norm, [layer], ratio, shift)
    per_tensor = UniformQuantizer(dataclasses.replace(aq.spec, per_channel=False), aq.bits)
    per_tensor.scale = s.reshape(1).to(aq.scale)
    per_tensor.zero_point = z.reshape(1).to(torch.int32).to(aq.zero_point.device)
    per_tensor.mode = aq.mode
    layer.a_quant = per_tensor.to(aq.scale.device)
    wq = layer.w_quant
    if hasattr(wq, "start_calibration"):  # re-initialise on the new weight, keeping the quantizer's mode
        mode = wq.mode
        wq.start_calibration()
        wq.observe(layer.weight.detach())
        wq.finish_calibration()
        wq.mode = mode
    return {"scale": float(s), "zero_point": int(z), "ratio_min": float(ratio.min()),
            "ratio_max": float(ratio.max())}


__all__ = [
    "FOLD_PAIRS", "FOLD_TOLERANCE", "max_relative_error", "norm_linear_pairs",
    "fold_into_layernorm", "reparameterize_post_norm",
]
