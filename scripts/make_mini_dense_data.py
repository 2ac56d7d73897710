"""Generate the mini detection / segmentation datasets (mini-coco, mini-ade) from Fashion-MNIST.

Scenes are 128x128 RGB canvases with 2-5 Fashion-MNIST items each (random scale, flip, tint,
occlusion) on a textured background; see tasks/mini_dense/scenes.py. Deterministic for a --seed.

    python scripts/make_mini_dense_data.py                 # val + calib -> tasks/mini_dense/data (vendored)
    python scripts/make_mini_dense_data.py --splits train  # train -> ~/.cache/vitq-bench/mini_dense/...

The val split draws items from Fashion-MNIST t10k, train and calib from its train split, so
evaluation items are disjoint from training and calibration items.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.mini_dense import build  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", nargs="+", default=["val", "calib"], choices=list(build.SIZES))
    ap.add_argument("--out", type=Path, default=None,
                    help="output root (default: tasks/mini_dense/data for val/calib, the cache for train)")
    ap.add_argument("--seed", type=int, default=build.SEED)
    ap.add_argument("--num", type=int, default=None, help="images per split (default: build.SIZES)")
    ap.add_argument("--fashion-root", default=None, help="Fashion-MNIST IDX directory (default: Debian path)")
    args = ap.parse_args(argv)

    for split in args.splits:
        t0 = time.time()
        if split == "train" and args.out is None:
            n = args.num or build.SIZES["train"]
            root = build.ensure_train_split(n=n, seed=args.seed, fashion_root=args.fashion_root)
            print(f"train: {root} ({time.time() - t0:.1f}s)")
            continue
        out = args.out or build.DATA_DIR
        for sub in (out / "mini-coco" / build.COCO_SPLIT_DIR[split],
                    out / "mini-ade" / "images" / build.ADE_SPLIT_DIR[split],
                    out / "mini-ade" / "annotations" / build.ADE_SPLIT_DIR[split]):
            shutil.rmtree(sub, ignore_errors=True)  # stale files of an earlier, larger run
        info = build.generate(split, out, n=args.num, seed=args.seed, fashion_root=args.fashion_root)
        print(f"{split}: {info} ({time.time() - t0:.1f}s)")
    if args.out is None and set(args.splits) & {"val", "calib"}:
        manifest = {"seed": args.seed, "sizes": build.SIZES, "generator": "scripts/make_mini_dense_data.py",
                    "files": build.file_hashes(build.DATA_DIR)}
        (build.DATA_DIR / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
