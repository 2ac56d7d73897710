"""SimCLR-style batch augmentation of synthetic images for distillation (MimiQ's fine-tuning).

MaskAQ/trainer.py:325-356 composes torchvision transforms and applies them to a whole batch tensor,
so every random parameter is drawn once per batch: RandomResizedCrop(size), RandomHorizontalFlip,
RandomApply(ColorJitter(0.8, 0.8, 0.8, 0.2) in de-normalised space, p = 0.8), RandomGrayscale(p = 0.2)
(on the normalised tensor, as composed there), GaussianBlur(kernel 2·⌊⌊0.1·size⌋/2⌋+1,
σ ~ U(0.1, 2.0), reflect padding; gaussian_blur.py). The torchvision functional ops do the maths; the
parameters are drawn here from a ``torch.Generator`` so runs are reproducible per seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from torch import Tensor

from methods.quant.target import InputSpec


@dataclass(frozen=True)
class BatchAugment:
    """Parameters of :func:`simclr_batch_augment` (defaults: the released code)."""

    crop: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
    gray_p: float = 0.2
    blur_fraction: float = 0.1  # kernel from int(0.1 · image size)
    blur_sigma: tuple[float, float] = (0.1, 2.0)


def _uniform(lo: float, hi: float, g: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def resized_crop_params(
    h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with the generator: (top, left, height, width)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], g)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], g))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            i = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            j = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return i, j, ch, cw
    in_ratio = w / h  # fallback: central crop
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def color_jitter(x01: Tensor, params: tuple[float, float, float, float], g: torch.Generator) -> Tensor:
    """torchvision ColorJitter on [0, 1] images: the four adjustments in a random order, factors
    brightness/contrast/saturation ~ U(max(0, 1-v), 1+v), hue ~ U(-v, v); one draw for the batch."""
    b, c, s, hue = params
    order = torch.randperm(4, generator=g).tolist()
    fb = _uniform(max(0.0, 1 - b), 1 + b, g)
    fc = _uniform(max(0.0, 1 - c), 1 + c, g)
    fs = _uniform(max(0.0, 1 - s), 1 + s, g)
    fh = _uniform(-hue, hue, g)
    for k in order:
        if k == 0 and b > 0:
            x01 = TF.adjust_brightness(x01, fb)
        elif k == 1 and c > 0:
            x01 = TF.adjust_contrast(x01, fc)
        elif k == 2 and s > 0:
            x01 = TF.adjust_saturation(x01, fs)  # identity on 1-channel images
        elif k == 3 and hue > 0:
            x01 = TF.adjust_hue(x01, fh)  # identity on 1-channel images
    return x01


def simclr_batch_augment(
    x: Tensor, spec: InputSpec, g: torch.Generator, aug: BatchAugment = BatchAugment()
) -> Tensor:
    """Augment a normalised batch (B, C, H, W); every random choice is shared by the batch."""
    _, c, h, w = x.shape
    if aug.crop:
        top, left, ch, cw = resized_crop_params(h, w, aug.crop_scale, aug.crop_ratio, g)
        x = TF.resized_crop(x, top, left, ch, cw, [h, w], antialias=True)
    if float(torch.rand((), generator=g)) < aug.flip_p:
        x = TF.hflip(x)
    if float(torch.rand((), generator=g)) < aug.jitter_p:
        mean = torch.tensor(spec.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = (color_jitter(x * std + mean, aug.jitter, g) - mean) / std
    if float(torch.rand((), generator=g)) < aug.gray_p and c == 3:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    radius = int(aug.blur_fraction * min(h, w)) // 2
    sigma = _uniform(aug.blur_sigma[0], aug.blur_sigma[1], g)
    if radius > 0:
        k = 2 * radius + 1
        x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    return x
