"""Write synthetic scenes in the real COCO and ADE20K directory layouts.

``mini-coco``  annotations/instances_{split}2017.json (bbox, RLE segmentation, area, iscrowd=0),
               images in {split}2017/ as JPEG.
``mini-ade``   images/{training,validation}/*.jpg and annotations/{training,validation}/*.png
               (0 = background 'other', ignored through reduce_zero_label; class k -> k + 1),
               plus images/calibration/ (calibration images, no labels).

The val and calib splits are vendored under ``tasks/mini_dense/data``; the train split is
regenerated from the seed into a cache directory (see :func:`ensure_train_split`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.mini import fashion
from tasks.mini_dense.scenes import CANVAS, SPLITS, Scene, make_scenes

DATA_DIR = Path(__file__).resolve().parent / "data"
SEED = 0
SIZES = {"val": 100, "calib": 64, "train": 8000}
JPEG_QUALITY = 90
COCO_SPLIT_DIR = {"train": "train2017", "val": "val2017", "calib": "calib2017"}
ADE_SPLIT_DIR = {"train": "training", "val": "validation", "calib": "calibration"}
ADE_PREFIX = {"train": "ADE_train", "val": "ADE_val", "calib": "ADE_calib"}
CLASSES = fashion.CLASSES


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=JPEG_QUALITY, subsampling=0)


def write_coco(scenes: list[Scene], split: str, root: Path) -> Path:
    """COCO instances json + JPEGs for one split; returns the json path."""
    img_dir = root / COCO_SPLIT_DIR[split]
    images, anns = [], []
    for i, scene in enumerate(scenes):
        image_id = i + 1
        name = f"{image_id:012d}.jpg"
        _save_jpeg(scene.image, img_dir / name)
        images.append({"id": image_id, "file_name": name, "height": CANVAS, "width": CANVAS})
        for inst in scene.instances:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": inst.label + 1,
                         "bbox": list(inst.bbox), "area": inst.area, "iscrowd": 0,
                         "segmentation": _rle(inst.mask)})
    coco = {
        "info": {"description": f"mini-coco {split}: Fashion-MNIST items on synthetic canvases",
                 "version": "1.0", "year": 2024},
        "licenses": [{"id": 1, "name": "MIT (Fashion-MNIST, Zalando SE)"}],
        "images": images,
        "annotations": anns,
        "categories": [{"id": k + 1, "name": c, "supercategory": "fashion"} for k, c in enumerate(CLASSES)],
    }
    ann = root / "annotations" / f"instances_{COCO_SPLIT_DIR[split]}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(coco, separators=(",", ":")))
    return ann


def write_ade(scenes: list[Scene], split: str, root: Path) -> None:
    """ADE20K-layout JPEGs and (except for calib) PNG label maps for one split."""
    sub = ADE_SPLIT_DIR[split]
    for i, scene in enumerate(scenes):
        stem = f"{ADE_PREFIX[split]}_{i + 1:08d}"
        _save_jpeg(scene.image, root / "images" / sub / f"{stem}.jpg")
        if split != "calib":
            png = root / "annotations" / sub / f"{stem}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(scene.label_map(), mode="L").save(png)


def fashion_items(split: str, fashion_root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Items and labels of the Fashion-MNIST split the scene split draws from."""
    root = Path(fashion_root) if fashion_root else fashion.DEBIAN_ROOT
    src = SPLITS[split][1]
    if not (root / f"{src}-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(f"Fashion-MNIST {src} split not found in {root}: "
                                "apt-get install dataset-fashion-mnist (or pass --fashion-root)")
    return fashion.read_split(root, src)


def generate(split: str, out: Path, n: int | None = None, seed: int = SEED,
             fashion_root: str | Path | None = None) -> dict:
    """Generate ``split`` into out/mini-coco and out/mini-ade; returns summary statistics."""
    items, labels = fashion_items(split, fashion_root)
    n = SIZES[split] if n is None else n
    scenes = make_scenes(seed, split, n, items, labels)
    write_coco(scenes, split, out / "mini-coco")
    write_ade(scenes, split, out / "mini-ade")
    counts = np.bincount([inst.label for s in scenes for inst in s.instances], minlength=len(CLASSES))
    return {"split": split, "images": n, "instances": int(counts.sum()), "per_class": counts.tolist(),
            "seed": seed}


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "MANIFEST.json"}


def cache_dir() -> Path:
    base = os.environ.get("VITQ_CACHE") or Path.home() / ".cache" / "vitq-bench"
    return Path(base) / "mini_dense"


def ensure_train_split(n: int = SIZES["train"], seed: int = SEED, out: Path | None = None,
                       fashion_root: str | Path | None = None) -> Path:
    """Generate the train split once (needs the Fashion-MNIST train split); returns the data root
    holding mini-coco/ and mini-ade/ for it."""
    out = Path(out) if out else cache_dir() / f"seed{seed}-n{n}"
    stamp = out / "DONE.json"
    if not stamp.is_file():
        info = generate("train", out, n=n, seed=seed, fashion_root=fashion_root)
        stamp.write_text(json.dumps(info))
    return out
