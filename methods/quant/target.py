"""QuantTarget: what a task hands a quantization method.

The task builds the FP model, runs :func:`methods.quant.surgery.prepare` on the
part to quantize (so attention matmuls are explicit modules), and describes the
input. Methods never import tasks; this dataclass is the whole interface.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class InputSpec:
    """Image tensor the model expects: (C, H, W), normalisation and the eval transform."""

    image_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    transform: str = ""  # human-readable eval transform, recorded in results

    def valid_range(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (lo, hi) of normalised pixel values for images in [0, 1], shaped (1, C, 1, 1)."""
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return (0 - mean) / std, (1 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0, 1)

    def shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.in_chans, *self.image_size)


@dataclass
class QuantTarget:
    """The FP model and what a method needs to know about it.

    ``model`` is the full FP model in eval mode (already prepared by surgery);
    ``quant_path`` names the submodule to quantize ("" = whole model,
    "backbone" for det/seg). ``logits`` maps images to class logits when the
    task has them (classification), else ``None``; ``features`` maps images to
    a list of intermediate feature maps (backbone stages) for task-independent
    distillation. ``family`` is "vit" or "swin".
    """

    model: nn.Module
    model_name: str
    quant_path: str
    input_spec: InputSpec
    family: str
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    features: Callable[[nn.Module, torch.Tensor], list[torch.Tensor]] | None = None
    num_classes: int | None = None
    info: dict = field(default_factory=dict)  # weights tag, transform, anything to record

    @property
    def quant_module(self) -> nn.Module:
        return self.model.get_submodule(self.quant_path) if self.quant_path else self.model

    @property
    def has_logits(self) -> bool:
        return self.logits is not None

    @property
    def prefix_tokens(self) -> int:
        """Class/register tokens ahead of the patch tokens (0 for Swin's window tokens)."""
        if self.family == "swin":
            return 0
        mod = self.quant_module
        return int(getattr(mod, "num_prefix_tokens", getattr(self.model, "num_prefix_tokens", 1)))
