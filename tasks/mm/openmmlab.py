"""Everything of the mmdet / mmseg tasks that touches OpenMMLab: configs, building, weights, data,
evaluation.

Both libraries keep their own registries; every build here runs under an explicit default scope so
a detector and a segmentor can live in one process (the harness runs cls, det and seg in turn).
Importing this module requires mmengine, mmcv, mmdet and mmseg (``pip install .[mm]``); the tasks
import it through :func:`tasks.mm.base.openmmlab`, which turns its absence into a one-line TaskError.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.config import Config, ConfigDict
from mmengine.dataset import Compose, pseudo_collate
from mmengine.evaluator import Evaluator
from mmengine.logging import MMLogger
from mmengine.registry import DefaultScope
from torch import nn

from tasks.base import TaskError
from tasks.mini import fashion

# --------------------------------------------------------------------------- registries / scope


def _registries(scope: str):
    """(MODELS, DATASETS, METRICS) of ``scope`` with all its modules registered."""
    if scope == "mmdet":
        from mmdet.registry import DATASETS, METRICS, MODELS
        from mmdet.utils import register_all_modules
    elif scope == "mmseg":
        from mmseg.registry import DATASETS, METRICS, MODELS
        from mmseg.utils import register_all_modules
    else:
        raise ValueError(f"unknown scope {scope!r}")
    register_all_modules(init_default_scope=False)
    return MODELS, DATASETS, METRICS


def scope(name: str):
    """Context manager: build and run under the default scope ``name`` ("mmdet" | "mmseg")."""
    _registries(name)
    _register_mini_ade()
    return DefaultScope.overwrite_default_scope(name)


_MINI_ADE_REGISTERED = False


def _register_mini_ade() -> None:
    """``MiniADE20KDataset``: mmseg's ADE20KDataset (ADE20K layout, reduce_zero_label) with the 10
    Fashion-MNIST classes as METAINFO; ADE20KDataset itself only accepts subsets of its 150 classes."""
    global _MINI_ADE_REGISTERED
    if _MINI_ADE_REGISTERED:
        return
    from mmseg.datasets import ADE20KDataset
    from mmseg.registry import DATASETS

    class MiniADE20KDataset(ADE20KDataset):
        METAINFO = dict(classes=tuple(fashion.CLASSES), palette=[list(p) for p in PALETTE])

    DATASETS.register_module(name="MiniADE20KDataset", module=MiniADE20KDataset, force=True)
    _MINI_ADE_REGISTERED = True


PALETTE = ((220, 20, 60), (119, 11, 32), (0, 0, 142), (0, 0, 230), (106, 0, 228), (0, 60, 100),
           (0, 80, 100), (0, 0, 70), (0, 0, 192), (250, 170, 30))


def quiet_logger() -> None:
    """Make mmengine's current logger error-only (CocoMetric/IoUMetric log whole tables at INFO)."""
    name = "vitq-bench-mm"
    if MMLogger.check_instance_created(name):
        MMLogger.get_instance(name)  # makes it the current instance again
    else:
        MMLogger.get_instance(name, log_level="ERROR")


# --------------------------------------------------------------------------- configs and models


def load_config(spec: str | Path) -> Config:
    """A config file path, or a library config as ``mmdet::swin/...py`` / ``mmseg::swin/...py``."""
    s = str(spec)
    try:
        if "::" in s:
            from mmengine.hub import get_config

            return get_config(s, pretrained=False)
        path = Path(s).expanduser()
        if not path.is_file():
            raise TaskError(f"config file {path} does not exist")
        return Config.fromfile(str(path))
    except TaskError:
        raise
    except Exception as e:  # unknown scope/file inside the package, syntax error, ...
        raise TaskError(f"cannot load config {s}: {type(e).__name__}: {_one_line(e)}") from e


def cpu_norm_cfg(node: Any) -> Any:
    """Replace SyncBN by BN everywhere in a config node (single-process CPU evaluation)."""
    if isinstance(node, dict):
        out = {k: cpu_norm_cfg(v) for k, v in node.items()}
        if out.get("type") in ("SyncBN", "MMSyncBN"):
            out["type"] = "BN"
        return out
    if isinstance(node, list | tuple):
        return type(node)(cpu_norm_cfg(v) for v in node)
    return node


def build_model(cfg: Config, scope_name: str) -> nn.Module:
    """Build ``cfg.model`` in ``scope_name`` (weights uninitialised: call init_weights or load)."""
    model_cfg = cpu_norm_cfg(cfg.model.to_dict())
    _strip_pretrained(model_cfg)
    models, _, _ = _registries(scope_name)
    with scope(scope_name):
        model = models.build(ConfigDict(model_cfg))
    if scope_name == "mmdet":
        allow_image_call(model)
    return model.eval()


def _strip_pretrained(model_cfg: dict) -> None:
    """Drop backbone 'Pretrained' init: the task loads full checkpoints, never ImageNet inits by URL."""
    bb = model_cfg.get("backbone", {})
    if isinstance(bb.get("init_cfg"), dict) and bb["init_cfg"].get("type") == "Pretrained":
        bb["init_cfg"] = None
    model_cfg.pop("pretrained", None)


def read_checkpoint(path: str | Path, *, trusted: bool = True) -> dict[str, torch.Tensor]:
    """The state_dict of a plain state_dict file or an mmengine/mmdet/mmseg checkpoint.

    ``trusted`` (files the user named): checkpoints written by mmengine hold non-tensor metadata that
    ``weights_only`` loading rejects; those are then unpickled fully, as mmengine itself does.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not trusted:
            raise TaskError(f"cannot read {path} as a weights-only checkpoint: {_one_line(e)}") from e
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise TaskError(f"cannot read checkpoint {path}: {type(e2).__name__}: {_one_line(e2)}") from e2
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TaskError(f"{path} holds no state_dict of tensors")
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load (fp16 files are computed in fp32); a mismatch is a one-line TaskError."""
    state = {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in state.items()}
    if any(k.startswith("backbone.layers.") for k in state):
        state = convert_original_swin(state)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise TaskError(f"{where} does not match the model: {len(result.missing_keys)} missing keys "
                        f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
                        f"(e.g. {result.unexpected_keys[:2]})")


def load_weights(model: nn.Module, path: str | Path, *, trusted: bool = True) -> None:
    load_state(model, read_checkpoint(path, trusted=trusted), str(path))


def convert_original_swin(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone keys of the Swin authors' detection checkpoints (``backbone.layers.*``, ``patch_embed.proj``)
    -> mmdet/mmseg ``SwinTransformer`` names, with mmdet's own converter (which also reorders the
    patch-merging weights); other keys unchanged."""
    from mmdet.models.backbones.swin import swin_converter

    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    out = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    out.update(swin_converter(backbone))  # returns "backbone."-prefixed keys
    return out


def _one_line(e: BaseException, n: int = 200) -> str:
    return " ".join(str(e).split())[:n]


# --------------------------------------------------------------------------- detectors called on images


class _ImageCall:
    """``model(images)`` without data samples: default samples (image shape, unit scale) are made,
    so methods can run a whole detector on bare image tensors (calibration, synthetic data)."""

    def forward(self, inputs, data_samples=None, mode: str = "tensor"):
        if data_samples is None:
            data_samples = default_det_samples(inputs)
        return super().forward(inputs, data_samples, mode)


# detector class -> its image-call subclass, and the same by subclass name: pickle finds a class by
# module attribute, which the module __getattr__ below answers from this explicit table
_IMAGE_CALL_CLASSES: dict[type, type] = {}
_IMAGE_CALL_BY_NAME: dict[str, type] = {}


def allow_image_call(model: nn.Module) -> nn.Module:
    """Swap the detector's class for a subclass accepting ``model(images)`` (idempotent)."""
    cls = type(model)
    if issubclass(cls, _ImageCall):
        return model
    if cls not in _IMAGE_CALL_CLASSES:
        sub = type(f"{cls.__name__}ImageCall", (_ImageCall, cls), {"__module__": __name__})
        _IMAGE_CALL_CLASSES[cls] = _IMAGE_CALL_BY_NAME[sub.__name__] = sub
    model.__class__ = _IMAGE_CALL_CLASSES[cls]
    return model


def __getattr__(name: str) -> type:
    """Module attributes for the image-call subclasses made so far (keeps them picklable by name)."""
    try:
        return _IMAGE_CALL_BY_NAME[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def default_det_samples(inputs: torch.Tensor) -> list:
    from mmdet.structures import DetDataSample

    h, w = inputs.shape[-2:]
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                scale_factor=(1.0, 1.0))
    return [DetDataSample(metainfo=meta) for _ in range(inputs.shape[0])]


def backbone_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Backbone stage outputs (N, C_i, H_i, W_i) of a detector / segmentor."""
    return list(model.backbone(x))


# --------------------------------------------------------------------------- data


def build_dataset(ds_cfg: dict, scope_name: str):
    _, datasets, _ = _registries(scope_name)
    with scope(scope_name), contextlib.redirect_stdout(io.StringIO()):  # pycocotools index messages
        return datasets.build(ds_cfg)


def build_data_preprocessor(cfg: Config, scope_name: str) -> nn.Module:
    models, _, _ = _registries(scope_name)
    with scope(scope_name):
        return models.build(ConfigDict(cfg.model.data_preprocessor.to_dict()))


def preprocess_images(preprocessor: nn.Module, paths: Sequence[str | Path], pipeline: list[dict],
                      scope_name: str, pad_to: tuple[int, int] | None = None) -> torch.Tensor:
    """Images -> the model's input tensor: the test ``pipeline`` (no annotations needed), then the
    model's ``preprocessor`` (BGR->RGB, normalise, pad); zero-padded (= the mean) to ``pad_to``."""
    with scope(scope_name):
        transform = Compose([dict(t) for t in pipeline if "Annotations" not in t["type"]])
        data = pseudo_collate([transform(dict(img_path=str(p), img_id=i)) for i, p in enumerate(paths)])
    with torch.no_grad():
        x = preprocessor(data, False)["inputs"].cpu()
    if pad_to is not None:
        h, w = x.shape[-2:]
        if h > pad_to[0] or w > pad_to[1]:
            x = x[..., : pad_to[0], : pad_to[1]]
        x = F.pad(x, (0, max(0, pad_to[1] - w), 0, max(0, pad_to[0] - h)))
    return x


@torch.no_grad()
def evaluate(model: nn.Module, dataset, metric_cfg: dict, scope_name: str, device: torch.device,
             batch_size: int = 10) -> dict[str, float]:
    """Run ``model.test_step`` over ``dataset`` in order and return the metric's results (unprefixed)."""
    _, _, metrics = _registries(scope_name)
    quiet_logger()
    with scope(scope_name), contextlib.redirect_stdout(io.StringIO()):  # CocoMetric loads its index
        evaluator = Evaluator(metrics.build(dict(metric_cfg)))
    evaluator.dataset_meta = dataset.metainfo
    was_training = model.training
    model.to(device).eval()
    try:
        for start in range(0, len(dataset), batch_size):
            batch = pseudo_collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            outputs = model.test_step(batch)
            evaluator.process(data_samples=outputs, data_batch=batch)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            results = evaluator.evaluate(len(dataset))
    finally:
        model.train(was_training)
    return {k.split("/", 1)[-1]: round(float(v), 4) for k, v in results.items() if np.ndim(v) == 0}

