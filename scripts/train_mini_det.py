"""Train the mini detectors (tasks/mm/det.py MINI_MODELS) on mini-coco with mmengine's Runner on CPU.

The train split (default 8000 scenes, Fashion-MNIST train items) is regenerated from the seed into
the cache (needs the Debian package ``dataset-fashion-mnist``); the vendored val split is never
used for training or model selection: the LAST epoch is saved as a plain fp16 state_dict in
tasks/mini_dense/weights/<name>.pt, then evaluated once with tasks/mm/det.py and logged in
tasks/mini_dense/weights/training_log.json (TRAINING.md is regenerated from it).

    python scripts/train_mini_det.py --models mini-mask-rcnn-swin mini-cascade-mask-rcnn-swin
    python scripts/train_mini_det.py --models mini-mask-rcnn-swin --probe 20   # time 20 iterations
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.base import file_sha256  # noqa: E402
from tasks.mini_dense.training import common_args, finish, prepare_run  # noqa: E402
from tasks.mm import openmmlab  # noqa: E402
from tasks.mm.det import MINI_MODELS, DetectionTask  # noqa: E402

# Per-model schedule (epochs over the train split). As real detectors start from a pretrained
# backbone, the Swin backbone starts from the mini-upernet-swin checkpoint (trained on the same
# generated train split by scripts/train_mini_seg.py, never on val); train that one first.
RECIPES = {
    "mini-mask-rcnn-swin": dict(epochs=8, lr=1e-3, batch_size=8, backbone_from="mini-upernet-swin"),
    "mini-cascade-mask-rcnn-swin": dict(epochs=8, lr=1e-3, batch_size=8, backbone_from="mini-upernet-swin"),
}


def train_one(name: str, args) -> dict:
    from mmengine.runner import Runner

    recipe = dict(RECIPES[name])
    for key in ("epochs", "lr", "batch_size"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    cfg, train_root, work_dir = prepare_run(MINI_MODELS[name].config, name, args, recipe, by_epoch=True)
    cfg.train_dataloader.dataset.data_root = str(train_root / "mini-coco")
    if args.backbone_from == "none":
        recipe.pop("backbone_from", None)
    elif args.backbone_from:
        recipe["backbone_from"] = args.backbone_from
    if recipe.get("backbone_from"):
        src = Path(recipe["backbone_from"])
        src = src if src.suffix else args.weights_dir / f"{src}.pt"
        if not src.is_file():
            raise SystemExit(f"backbone checkpoint {src} missing: run scripts/train_mini_seg.py first "
                             "(or --backbone-from none)")
        # mmdet's SwinTransformer.init_weights keeps the "backbone." keys of a full-model checkpoint
        cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=str(src))
        recipe["backbone_sha256"] = file_sha256(src)
    epochs = recipe["epochs"]
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=epochs, val_interval=epochs + 1)
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=300),
        dict(type="CosineAnnealingLR", eta_min=recipe["lr"] * 0.01, begin=0, end=epochs, by_epoch=True,
             convert_to_iter_based=True),
    ]
    if args.probe:
        cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=args.probe, val_interval=args.probe + 1)
        cfg.param_scheduler = []
    t0 = time.time()
    with openmmlab.scope("mmdet"):
        runner = Runner.from_cfg(cfg)
        runner.train()
    train_s = time.time() - t0
    return finish(name, runner.model, args, recipe, train_s, work_dir, DetectionTask(), cfg)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, list(MINI_MODELS))
    ap.add_argument("--backbone-from", default=None,
                    help="mini model name or checkpoint whose backbone initialises ours ('none': random)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.models:
        train_one(name, args)


if __name__ == "__main__":
    main()
