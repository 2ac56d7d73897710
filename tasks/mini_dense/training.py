"""Shared parts of scripts/train_mini_det.py and scripts/train_mini_seg.py (mmengine Runner on CPU).

Training never sees the vendored val split: validation is switched off in the Runner, the last
iteration is saved, then the saved checkpoint is evaluated once through the task (tasks/mm/det.py,
tasks/mm/seg.py) exactly as the harness will, and the result is logged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.mini_dense import build
from tasks.mm import openmmlab
from tasks.mm.base import CONFIG_DIR, WEIGHTS_DIR

FP16_TOLERANCE = 0.3  # points of the primary metric an fp16 checkpoint may lose before fp32 is kept


def common_args(ap: argparse.ArgumentParser, models: list[str]) -> None:
    ap.add_argument("--models", nargs="+", default=models, choices=models)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe (det)")
    ap.add_argument("--iters", type=int, default=None, help="override the recipe (seg)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--train-images", type=int, default=build.SIZES["train"])
    ap.add_argument("--fashion-root", default=None)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/vitq-mini-dense"))
    ap.add_argument("--probe", type=int, default=0, help="only time this many iterations; save nothing")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the last checkpoint in --work-dir (same recipe)")
    ap.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR,
                    help="where the checkpoint, training_log.json and TRAINING.md go")


def prepare_run(config: str, name: str, args, recipe: dict, by_epoch: bool) -> tuple[Any, Path, Path]:
    """Config with the train split, recipe, seed and CPU settings applied; validation switched off."""
    train_root = build.ensure_train_split(n=args.train_images, seed=build.SEED,
                                          fashion_root=args.fashion_root)
    cfg = openmmlab.load_config(CONFIG_DIR / config)
    work_dir = args.work_dir / name
    cfg.work_dir = str(work_dir)
    cfg.randomness = dict(seed=args.seed, deterministic=False)
    cfg.launcher = "none"
    cfg.env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=1),
                       dist_cfg=dict(backend="gloo"))
    cfg.train_dataloader.batch_size = recipe["batch_size"]
    cfg.optim_wrapper.optimizer.lr = recipe["lr"]
    for key in ("val_dataloader", "val_cfg", "val_evaluator",
                "test_dataloader", "test_cfg", "test_evaluator"):
        cfg[key] = None
    # resumable: the last checkpoint (with optimizer state) is kept in the work dir, never committed
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=by_epoch,
                                        interval=1 if by_epoch else 500, max_keep_ckpts=1, save_last=True)
    cfg.resume = bool(args.resume)
    if args.resume:  # our own mmengine checkpoints hold non-tensor state; torch>=2.6 loads weights only
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    return cfg, train_root, work_dir


def finish(name: str, model: nn.Module, args, recipe: dict, train_s: float, work_dir: Path, task,
           cfg) -> dict:
    """Save the last state (fp16 unless that costs accuracy), evaluate it through the task, log it."""
    if args.probe:
        print(f"{name}: {args.probe} iterations in {train_s:.1f}s = {train_s / args.probe:.2f} s/it")
        return {}
    wdir = Path(args.weights_dir)
    wdir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = wdir / f"{name}.pt"
    tmp32 = work_dir / f"{name}.fp32.pt"
    torch.save(state, tmp32)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, out)
    results = {}
    for prec, path in (("fp16", out), ("fp32", tmp32)):
        t0 = time.time()
        handle = task.load(name, "mini", weights=str(path))
        metrics = task.evaluate(handle, handle.target.model, "cpu")
        results[prec] = dict(metrics=metrics, eval_s=round(time.time() - t0, 1))
        print(f"{name} [{prec}] {metrics} ({results[prec]['eval_s']}s)")
    primary = task.primary_metric
    stored = "fp16"
    if results["fp32"]["metrics"][primary] - results["fp16"]["metrics"][primary] > FP16_TOLERANCE:
        torch.save(state, out)
        stored = "fp32"
    record = dict(
        model=name, config=str(Path(cfg.filename).name) if cfg.filename else "", recipe=recipe,
        seed=args.seed, threads=args.threads, train_images=args.train_images, train_seconds=round(train_s),
        resumed=bool(args.resume), stored=stored, size_mb=round(out.stat().st_size / 2**20, 2),
        metrics=results[stored]["metrics"],
        fp32_metrics=results["fp32"]["metrics"], eval_seconds=results[stored]["eval_s"],
        params=sum(p.numel() for p in model.parameters()),
        command="python " + " ".join(shlex.quote(a) for a in sys.argv),
        host=dict(python=platform.python_version(), torch=torch.__version__, machine=platform.machine()),
        date=time.strftime("%Y-%m-%d %H:%M"),
    )
    log_path = wdir / "training_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    log[name] = record
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    write_report(log, wdir / "TRAINING.md")
    return record


def write_report(log: dict, path: Path) -> None:
    lines = ["# Mini detection / segmentation checkpoints", "",
             "Written by `scripts/train_mini_det.py` / `scripts/train_mini_seg.py` from `training_log.json`.",
             "Trained from scratch on the generated train split (seed 0, Fashion-MNIST *train* items); "
             "the last iteration is saved (no model selection); metrics are on the vendored val split "
             "(Fashion-MNIST *t10k* items), in percent. Regression baselines, not paper numbers.", ""]
    for name, r in sorted(log.items()):
        metrics = ", ".join(f"{k} {v:.1f}" for k, v in r["metrics"].items())
        lines += [f"## {name}", "",
                  f"- config: `tasks/mini_dense/configs/{r['config']}`, {r['params'] / 1e6:.2f}M parameters, "
                  f"stored {r['stored']} ({r['size_mb']} MB)",
                  f"- recipe: `{json.dumps(r['recipe'])}`, seed {r['seed']}, "
                  f"{r['train_images']} train images, "
                  f"{r['threads']} thread(s), {r['train_seconds'] / 60:.0f} min",
                  f"- val: {metrics} (evaluation {r['eval_seconds']} s)",
                  f"- command: `{r['command']}` ({r['date']}, torch {r['host']['torch']})"]
        lines += [f"- note: {n}" for n in r.get("notes", [])] + [""]
    path.write_text("\n".join(lines))
