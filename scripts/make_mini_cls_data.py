"""Vendor the Fashion-MNIST mini subsets used by the offline classification suite.

Writes tasks/mini/fashion_mnist_mini.npz (uint8, compressed):
  eval_*  : a class-balanced subset of the t10k split (default 200 per class = 2000 images)
  calib_* : a random subset of the train split (default 512 images), for PTQ calibration
Calibration comes from the train split and evaluation from the test split, so they are
disjoint by construction (checked below anyway). Deterministic for a given --seed.

    python scripts/make_mini_cls_data.py [--fashion-root /usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.mini.fashion import DEBIAN_ROOT, MINI_NPZ, read_split  # noqa: E402


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fashion-root", type=Path, default=DEBIAN_ROOT)
    p.add_argument("--eval-per-class", type=int, default=200)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=MINI_NPZ)
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    test_x, test_y = read_split(args.fashion_root, "t10k")
    train_x, train_y = read_split(args.fashion_root, "train")
    eval_idx = balanced_subset(test_y, args.eval_per_class, rng)
    calib_idx = np.sort(rng.choice(len(train_y), args.calib, replace=False))

    # Different splits, but make sure no pixel-identical image leaks between them either.
    eval_hashes = {hashlib.sha1(test_x[i].tobytes()).digest() for i in eval_idx}
    leaks = sum(hashlib.sha1(train_x[i].tobytes()).digest() in eval_hashes for i in calib_idx)
    if leaks:
        raise SystemExit(f"{leaks} calibration images are pixel-identical to evaluation images")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        eval_images=test_x[eval_idx], eval_labels=test_y[eval_idx], eval_index=eval_idx.astype(np.int32),
        calib_images=train_x[calib_idx], calib_labels=train_y[calib_idx],
        calib_index=calib_idx.astype(np.int32),
    )
    train_f = train_x.astype(np.float64) / 255.0
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): eval {len(eval_idx)} from t10k, "
          f"calib {len(calib_idx)} from train; train pixel mean {train_f.mean():.4f} std {train_f.std():.4f}")
    print("calib class counts:", np.bincount(train_y[calib_idx], minlength=10).tolist())


if __name__ == "__main__":
    main()
