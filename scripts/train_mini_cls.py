"""Train the mini classification models (tasks/cls.py MINI_MODELS) on Fashion-MNIST.

Trains on the 60k train split (the Debian package ``dataset-fashion-mnist`` or --fashion-root),
seeded and single-threaded by default, with random horizontal flips, AdamW,
linear warm-up + cosine decay and label smoothing. mini-deit is trained DeiT-style: its class head on
the labels, its distillation head on the hard predictions of the mini-vit teacher (train mini-vit
first). The LAST epoch is saved (no selection on the evaluation set; the per-epoch mini-eval
accuracy is only logged) as a plain fp16 state_dict in tasks/mini/weights/<name>.pt (fp32 if fp16
costs accuracy), and tasks/mini/weights/TRAINING.md is regenerated from training_log.json.

    python scripts/train_mini_cls.py --models mini-vit mini-deit mini-swin [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.cls import MINI_MODELS, ClassificationTask, build_mini_model, mini_pixels  # noqa: E402
from tasks.mini.fashion import DEBIAN_ROOT, WEIGHTS_DIR, read_split  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    batch_size: int = 128
    teacher: str | None = None  # hard-label distillation target for the distillation head
    augment: str = "flip"  # "flip" (horizontal), "shift+flip" (also random +-2 px shifts) or "none"


# Epochs chosen so each run takes at most about 15 min of CPU time on one core (see TRAINING.md).
# How the recipes were chosen is written into TRAINING.md (HISTORY below).
HISTORY = (
    "A first run (mini-vit, 7 epochs, random +-2 px shifts + flips) ended at 85.4% on the mini eval set, "
    "too close to the 85% bar. The recipe was then revised only on trials scored on 5000 held-out train "
    "images (`--holdout 5000`, 1000 steps): shifts+flips 77.1%, no augmentation 83.6%, flips only 83.6% "
    "(lr 1e-3); no augmentation at lr 2e-3 85.5%. So: flips only, lr 2e-3, one more epoch for mini-vit. "
    "A first mini-swin (28x28 input, patch 2, window 7, dim 32; batch 256, lr 4e-3, 6 epochs) ended at "
    "84.6% on the mini eval set: its many tiny window matmuls made it slow per image. It was replaced by "
    "the 32x32 (zero-padded) patch-4, window-4, dim-64 model, 3.5x cheaper per image; holdout trials "
    "(1000 steps): lr 2e-3 85.7%, lr 4e-3 85.8%, so the common lr 2e-3 and 10 epochs."
)
RECIPES = {
    "mini-vit": Recipe(epochs=8),
    "mini-deit": Recipe(epochs=6, teacher="mini-vit"),
    "mini-swin": Recipe(epochs=10),
}


def augment(x: torch.Tensor, gen: torch.Generator, kind: str, pad: int = 2) -> torch.Tensor:
    """Horizontal flip, optionally after a random shift by up to ``pad`` px (zero = background fill),
    on uint8 (B, 28, 28)."""
    if kind == "none":
        return x
    b, h, w = x.shape
    out = x
    if kind == "shift+flip":
        padded = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=gen)
        rows = oy + torch.arange(h).view(1, h, 1)
        cols = ox + torch.arange(w).view(1, 1, w)
        out = padded[torch.arange(b).view(b, 1, 1), rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip.view(b, 1, 1), out.flip(-1), out)


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def load_teacher(name: str, out_dir: Path) -> nn.Module:
    path = out_dir / f"{name}.pt"
    if not path.is_file():
        raise SystemExit(f"teacher checkpoint {path} missing: train {name} first")
    teacher = build_mini_model(name)
    teacher.load_state_dict({k: v.float() for k, v in torch.load(path, weights_only=True).items()})
    return teacher.eval()


def holdout_top1(model: nn.Module, images: np.ndarray, labels: np.ndarray, size: int) -> float:
    with torch.no_grad():
        x = mini_pixels(images.copy(), size)
        pred = torch.cat([model(x[i: i + 500]).argmax(-1) for i in range(0, len(x), 500)])
    return 100.0 * float((pred == torch.from_numpy(labels.astype(np.int64))).float().mean())


def train_one(name: str, recipe: Recipe, images: np.ndarray, labels: np.ndarray, args,
              holdout: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = build_mini_model(name)
    n_params = sum(p.numel() for p in model.parameters())
    size = MINI_MODELS[name].kwargs["img_size"]  # 28, or zero-padded to 32
    teacher = load_teacher(recipe.teacher, args.out_dir) if recipe.teacher else None
    distilled = hasattr(model, "set_distilled_training")
    if distilled:
        model.set_distilled_training(True)

    # No weight decay on norms, biases, tokens and position embeddings (the usual ViT recipe).
    def decays(n: str, p: torch.Tensor) -> bool:
        return p.ndim > 1 and "token" not in n and "pos_embed" not in n

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
    x_all, y_all = torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
    steps_per_epoch = len(y_all) // recipe.batch_size  # drop the last partial batch
    total = steps_per_epoch * recipe.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = int(recipe.warmup_epochs * steps_per_epoch)
    task = ClassificationTask()
    handle = task.handle_for(model, name, "mini")  # eval transform of this model (no surgery: it trains)
    history, step, t0, cpu0 = [], 0, time.time(), time.process_time()
    for epoch in range(recipe.epochs):
        model.train()
        perm = torch.randperm(len(y_all), generator=gen)
        loss_sum, seen = 0.0, 0
        for i in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[i * recipe.batch_size: (i + 1) * recipe.batch_size]
            x, y = mini_pixels(augment(x_all[idx], gen, recipe.augment), size), y_all[idx]
            for g in opt.param_groups:
                g["lr"] = recipe.lr * lr_factor(step, total, warmup)
            out = model(x)
            if distilled:
                cls_out, dist_out = out
                with torch.no_grad():
                    dist_y = teacher(x).argmax(-1) if teacher is not None else y
                loss = 0.5 * F.cross_entropy(cls_out, y, label_smoothing=recipe.label_smoothing) + \
                    0.5 * F.cross_entropy(dist_out, dist_y)
            else:
                loss = F.cross_entropy(out, y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            step += 1
            if step % 100 == 0:
                print(f"  {name} step {step}/{total} loss {loss_sum / seen:.4f} "
                      f"{(time.time() - t0) / step * 1000:.0f} ms/step", flush=True)
        if seen == 0:
            break
        model.eval()
        history.append({"epoch": epoch + 1, "steps": step, "train_loss": round(loss_sum / seen, 4)})
        if holdout is not None:  # recipe trials: judge on held-out train images, never on the eval set
            history[-1]["holdout_top1"] = round(holdout_top1(model, *holdout, size), 2)
        else:  # logged only; the last epoch is kept whatever it says
            history[-1]["mini_top1"] = round(task.evaluate(handle, model, "cpu")["top1"], 2)
        history[-1]["elapsed_s"] = round(time.time() - t0, 1)
        print(f"{name} epoch {epoch + 1}: {history[-1]}", flush=True)
    train_time, cpu_time = time.time() - t0, time.process_time() - cpu0

    if distilled:
        model.set_distilled_training(False)
    model.eval()
    fp32 = task.evaluate(handle, model, "cpu")
    state16 = {k: v.half() for k, v in model.state_dict().items()}
    check = build_mini_model(name)
    check.load_state_dict({k: v.float() for k, v in state16.items()})
    fp16 = task.evaluate(handle, check, "cpu")
    # fp16 storage halves the file; keep fp32 only if rounding costs accuracy that matters.
    use16 = fp16["top1"] >= 85.0 and fp16["top1"] >= fp32["top1"] - 0.3
    state = state16 if use16 else model.state_dict()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{name}.pt"
    torch.save(state, path)
    final = fp16 if use16 else fp32
    return {
        "model": name, "config": {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in MINI_MODELS[name].kwargs.items()},
        "timm_class": type(model).__name__, "params": n_params, "recipe": asdict(recipe),
        "seed": args.seed, "threads": args.threads, "steps": step, "train_time_s": round(train_time, 1),
        "cpu_time_s": round(cpu_time, 1),
        "history": history, "final_fp32": {k: round(v, 2) for k, v in fp32.items()},
        "final_saved": {k: round(v, 2) for k, v in final.items()}, "dtype": "float16" if use16 else "float32",
        "file": path.name, "file_bytes": path.stat().st_size,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "env": {"torch": torch.__version__, "python": platform.python_version(),
                "machine": platform.machine()},
    }


def write_report(log: dict, out: Path) -> None:
    lines = [
        "# Mini classification checkpoints",
        "",
        "Generated by `scripts/train_mini_cls.py` (do not edit by hand). Fashion-MNIST train split (60k),",
        "evaluated on the vendored mini eval subset (2000 t10k images, tasks/mini/fashion_mnist_mini.npz).",
        "The last epoch is saved; the per-epoch eval accuracy is logged only (no selection on it).",
        "These are regression baselines for CI, not paper numbers.",
        "",
        f"How the recipes were chosen: {HISTORY}",
        "",
        "Train time is wall-clock on a shared 2-core machine (other jobs running); CPU time is this",
        "process's own CPU time (single thread), the better measure of cost.",
        "",
        "| model | timm class | params | epochs | wall time | CPU time | mini top-1 | mini top-5 | stored "
        "| size |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in log.values():
        lines.append(f"| {r['model']} | {r['timm_class']} | {r['params']:,} | {r['recipe']['epochs']} | "
                     f"{r['train_time_s'] / 60:.1f} min | {r['cpu_time_s'] / 60:.1f} min | "
                     f"{r['final_saved']['top1']:.2f} | "
                     f"{r['final_saved']['top5']:.2f} | {r['dtype']} | {r['file_bytes'] / 1e6:.2f} MB |")
    for r in log.values():
        lines += ["", f"## {r['model']}", "", f"Command: `{r['command']}`  ", f"Seed {r['seed']}, "
                  f"{r['threads']} thread(s), {r['steps']} steps, torch {r['env']['torch']}.  ",
                  f"Architecture: `{json.dumps(r['config'])}`  ", f"Recipe: `{json.dumps(r['recipe'])}`  ",
                  f"Final (fp32 before storage): top-1 {r['final_fp32']['top1']:.2f}, "
                  f"top-5 {r['final_fp32']['top5']:.2f}; stored {r['dtype']}: top-1 "
                  f"{r['final_saved']['top1']:.2f}.", "",
                  "| epoch | steps | train loss | mini top-1 (logged) | elapsed |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {h['epoch']} | {h['steps']} | {h['train_loss']:.4f} | {h['mini_top1']:.2f} | "
                  f"{h['elapsed_s']:.0f} s |" for h in r["history"]]
    # keep sections other scripts own (e.g. scripts/fit_dinov2_head.py's marked mini-dinov2 block)
    old = out.read_text() if out.is_file() else ""
    kept = re.findall(r"<!-- [\w-]+: begin .*?<!-- [\w-]+: end -->\n?", old, flags=re.S)
    out.write_text("\n".join(lines) + "\n" + "".join("\n" + k for k in kept))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--fashion-root", type=Path, default=DEBIAN_ROOT)
    p.add_argument("--out-dir", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=None, help="override the recipe (for quick trials)")
    p.add_argument("--lr", type=float, default=None, help="override the recipe (for quick trials)")
    p.add_argument("--augment", choices=["none", "flip", "shift+flip"], default=None,
                   help="override the recipe (for quick trials)")
    p.add_argument("--holdout", type=int, default=0,
                   help="trials: hold out this many train images and log accuracy on them")
    p.add_argument("--max-steps", type=int, default=0, help="stop early (timing probes); 0 = full run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    images, labels = read_split(args.fashion_root, "train")
    holdout = None
    if args.holdout:  # recipe trials only: train on the rest, report accuracy on the held-out part
        if args.out_dir.resolve() == WEIGHTS_DIR.resolve():
            raise SystemExit("--holdout is for trials: pass --out-dir outside tasks/mini/weights")
        perm = np.random.default_rng(args.seed).permutation(len(labels))
        holdout = images[perm[: args.holdout]], labels[perm[: args.holdout]]
        images, labels = images[perm[args.holdout:]], labels[perm[args.holdout:]]
    log_path = args.out_dir / "training_log.json"
    for name in args.models:
        recipe = RECIPES[name]
        if args.epochs or args.lr or args.augment:
            recipe = Recipe(**{**asdict(recipe), "epochs": args.epochs or recipe.epochs,
                               "lr": args.lr or recipe.lr, "augment": args.augment or recipe.augment})
        print(f"== {name}: {recipe}", flush=True)
        rec = train_one(name, recipe, images, labels, args, holdout)
        print(f"== {name}: {rec['params']:,} params, {rec['train_time_s']:.0f} s, "
              f"final {rec['final_saved']}, {rec['dtype']} {rec['file_bytes'] / 1e6:.2f} MB", flush=True)
        # re-read just before writing: another run (other models) may have updated the log meanwhile
        log = json.loads(log_path.read_text()) if log_path.is_file() else {}
        log[name] = rec
        log = {k: log[k] for k in RECIPES if k in log}  # stable order
        log_path.write_text(json.dumps(log, indent=1) + "\n")
        write_report(log, args.out_dir / "TRAINING.md")


if __name__ == "__main__":
    main()
