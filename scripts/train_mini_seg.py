"""Train the mini segmentor (tasks/mm/seg.py MINI_MODELS) on mini-ade with mmengine's Runner on CPU.

The train split (default 8000 scenes, Fashion-MNIST train items) is regenerated from the seed into
the cache (needs the Debian package ``dataset-fashion-mnist``); the vendored val split is never
used for training or model selection: the LAST iteration is saved as a plain fp16 state_dict in
tasks/mini_dense/weights/<name>.pt, then evaluated once with tasks/mm/seg.py and logged in
tasks/mini_dense/weights/training_log.json (TRAINING.md is regenerated from it).

    python scripts/train_mini_seg.py
    python scripts/train_mini_seg.py --probe 20   # time 20 iterations
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.mini_dense.training import common_args, finish, prepare_run  # noqa: E402
from tasks.mm import openmmlab  # noqa: E402
from tasks.mm.seg import MINI_MODELS, SegmentationTask  # noqa: E402

RECIPES = {"mini-upernet-swin": dict(iters=10000, lr=1e-3, batch_size=8)}


def train_one(name: str, args) -> dict:
    from mmengine.runner import Runner

    recipe = dict(RECIPES[name])
    for key in ("iters", "lr", "batch_size"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    cfg, train_root, work_dir = prepare_run(MINI_MODELS[name].config, name, args, recipe, by_epoch=False)
    cfg.train_dataloader.dataset.data_root = str(train_root / "mini-ade")
    iters = args.probe or recipe["iters"]
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters + 1)
    warmup = min(200, iters // 10)
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=warmup),
        dict(type="PolyLR", eta_min=0.0, power=1.0, begin=warmup, end=iters, by_epoch=False),
    ]
    t0 = time.time()
    with openmmlab.scope("mmseg"):
        runner = Runner.from_cfg(cfg)
        runner.train()
    return finish(name, runner.model, args, recipe, time.time() - t0, work_dir, SegmentationTask(), cfg)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(ap, list(MINI_MODELS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.models:
        train_one(name, args)


if __name__ == "__main__":
    main()
