"""Synthetic dense-prediction scenes: Fashion-MNIST items pasted onto textured 128x128 canvases.

Every scene is a pure function of (seed, split, index) and the Fashion-MNIST split it draws items
from, so the train split need not be stored: ``scripts/make_mini_dense_data.py`` writes the small
val/calib splits into the repo and regenerates the train split on demand. One scene gives both
annotation kinds: exact per-instance boxes and masks (``mini-coco``) and a class label map
(``mini-ade``).

Instance masks are the item pixels whose intensity after resizing is above ``MASK_THRESHOLD``;
later items occlude earlier ones, and every box is the tight box of the *visible* mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

CANVAS = 128
MASK_THRESHOLD = 0.15  # item intensity in [0, 1] above which a pixel belongs to the item
ITEMS_PER_IMAGE = (2, 5)  # inclusive range
ITEM_SIDE = (24, 64)  # side of the resized 28x28 item frame, px (log-uniform)
MIN_VISIBLE = 0.7  # an occluded item keeps at least this fraction of its pixels
MIN_PIXELS = 20  # items with fewer visible pixels are not placed
# Split name -> (stream id, Fashion-MNIST split items come from). Stream ids keep splits independent.
SPLITS = {"train": (0, "train"), "calib": (1, "train"), "val": (2, "t10k")}


@dataclass
class Instance:
    label: int  # Fashion-MNIST class, 0..9
    mask: np.ndarray  # (H, W) bool, visible pixels
    source_index: int  # index of the item in its Fashion-MNIST split

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Tight COCO box (x, y, w, h) of the visible mask, in integer pixels."""
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    instances: list[Instance]

    def label_map(self) -> np.ndarray:
        """(H, W) uint8 ADE20K convention: 0 = background ('other', ignored), class k -> k + 1."""
        out = np.zeros(self.image.shape[:2], np.uint8)
        for inst in self.instances:
            out[inst.mask] = inst.label + 1
        return out


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark low-frequency colour noise, faint stripes and blobs, fine grain; float (H, W, 3) in [0, 1]."""
    coarse = rng.uniform(0.0, 1.0, (6, 6, 3)).astype(np.float32)
    base = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize((size, size), Image.BILINEAR))
                     for c in range(3)], -1)
    tint = rng.uniform(0.4, 1.0, 3).astype(np.float32)
    img = 0.05 + 0.3 * base * tint
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if rng.random() < 0.5:  # stripes
        theta, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / period)
        img += (0.06 * np.sin(phase))[..., None]
    for _ in range(rng.integers(0, 4)):  # soft blobs: clutter that is not an object
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(4, 16)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += 0.2 * blob[..., None] * rng.uniform(0.3, 1.0, 3).astype(np.float32)
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _resized_item(item: np.ndarray, side: int, flip: bool) -> np.ndarray:
    """28x28 uint8 item -> (side, side) float intensity in [0, 1]."""
    arr = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), np.float32) / 255.0
    return arr[:, ::-1] if flip else arr


def make_scene(
    rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, size: int = CANVAS
) -> Scene:
    """One scene from ``rng``, drawing items from ``items`` (N, 28, 28) uint8 / ``labels`` (N,)."""
    img = _background(rng, size)
    owner = np.full((size, size), -1, np.int32)  # index of the visible instance at each pixel
    full_area: list[int] = []
    placed: list[tuple[int, int]] = []  # (label, source index)
    n_items = int(rng.integers(ITEMS_PER_IMAGE[0], ITEMS_PER_IMAGE[1] + 1))
    for _ in range(n_items):
        src = int(rng.integers(len(items)))
        side = int(round(np.exp(rng.uniform(np.log(ITEM_SIDE[0]), np.log(ITEM_SIDE[1])))))
        inten = _resized_item(items[src], side, bool(rng.random() < 0.5))
        mask = inten > MASK_THRESHOLD
        if mask.sum() < MIN_PIXELS:
            continue
        gray = rng.random() < 0.3
        color = np.full(3, rng.uniform(0.6, 1.0)) if gray else rng.uniform(0.45, 1.0, 3)
        for _attempt in range(20):
            y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
            new_owner = owner.copy()
            win = new_owner[y0:y0 + side, x0:x0 + side]
            win[mask] = len(full_area)
            counts = np.bincount(new_owner[new_owner >= 0], minlength=len(full_area) + 1)
            if all(counts[i] >= MIN_VISIBLE * a for i, a in enumerate(full_area)):
                break
        else:
            continue  # no placement keeps the earlier items visible enough
        owner = new_owner
        full_area.append(int(mask.sum()))
        placed.append((int(labels[src]), src))
        patch = img[y0:y0 + side, x0:x0 + side]
        shade = (0.3 + 0.7 * inten[..., None]) * color
        patch[mask] = shade[mask]
    img += rng.normal(0, 0.01, img.shape)
    image = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    instances = [Instance(label, owner == i, src) for i, (label, src) in enumerate(placed)]
    return Scene(image, [inst for inst in instances if inst.area >= MIN_PIXELS])


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of scene ``index`` of ``split``: independent of how many scenes are made."""
    return np.random.default_rng([seed, SPLITS[split][0], index])


def make_scenes(seed: int, split: str, n: int, items: np.ndarray, labels: np.ndarray) -> list[Scene]:
    return [make_scene(scene_rng(seed, split, i), items, labels) for i in range(n)]
