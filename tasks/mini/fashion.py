"""Fashion-MNIST readers: the raw IDX files (Debian ``dataset-fashion-mnist``) and the vendored mini subset.

The mini subset (``fashion_mnist_mini.npz``) is written by ``scripts/make_mini_cls_data.py``:
an evaluation subset of the t10k split and a disjoint calibration subset of the train split.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

MINI_DIR = Path(__file__).resolve().parent
MINI_NPZ = MINI_DIR / "fashion_mnist_mini.npz"
WEIGHTS_DIR = MINI_DIR / "weights"
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Pixel statistics of the 60k train images in [0, 1] (computed by scripts/make_mini_cls_data.py).
MEAN = (0.2860,)
STD = (0.3530,)


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (gzipped) IDX file: uint8 images (N, 28, 28) or labels (N,)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload
        raise ValueError(f"{path}: not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of split "train" or "t10k" from an IDX directory."""
    root = Path(root)
    images = read_idx(root / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{split}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise ValueError(f"{root}/{split}: {len(images)} images but {len(labels)} labels")
    return images, labels


@dataclass(frozen=True)
class MiniSubset:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64
    source_index: np.ndarray  # index of each image in its original split
    split: str  # original Fashion-MNIST split


@lru_cache(maxsize=1)
def load_mini(path: str | Path = MINI_NPZ) -> dict[str, MiniSubset]:
    """The vendored subsets: {"eval": from t10k, "calib": from train}."""
    with np.load(path) as z:
        return {
            "eval": MiniSubset(z["eval_images"], z["eval_labels"].astype(np.int64),
                               z["eval_index"].astype(np.int64), "t10k"),
            "calib": MiniSubset(z["calib_images"], z["calib_labels"].astype(np.int64),
                                z["calib_index"].astype(np.int64), "train"),
        }
