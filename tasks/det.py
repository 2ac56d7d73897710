"""Object detection / instance segmentation: mmdet 3.3 Mask R-CNN and Cascade Mask R-CNN with Swin.

``full``: COCO val2017 under ``--data-root`` (``annotations/instances_val2017.json`` + ``val2017/``)
through mmdet's ``CocoDataset``; models from mmdet's own configs (Mask R-CNN Swin-T/S) or from the
configs in tasks/mini_dense/configs (Cascade Mask R-CNN Swin-T/S, the Swin paper's recipe, which
mmdet does not ship); weights from ``--weights`` or mmdet's published URL when online.
``mini``: tiny Swin detectors on the generated 128x128 ``mini-coco`` set (tasks/mini_dense),
checkpoints trained by scripts/train_mini_det.py. Metrics: mmdet's ``CocoMetric`` (bbox and segm
AP), reported in percent (x100) like every metric of the harness.

The QuantTarget quantizes the backbone by default (``quant_scope="all"``: the whole detector, neck and
heads included). The prepared detector also accepts ``model(images)`` without data samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from methods.quant.target import InputSpec, QuantTarget
from tasks.base import DATASETS, TaskError, register_task

METRICS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_50", "segm_mAP_75")
QUANT_SCOPES = ("backbone", "all")


@dataclass(frozen=True)
class DetModel:
    config: str  # file in tasks/mini_dense/configs, or an mmdet:: config
    url: str | None = None  # published checkpoint (full models)
    arch: str = "mask-rcnn"

    def config_spec(self) -> str:
        return self.config if "::" in self.config else str(_config_dir() / self.config)


MINI_MODELS = {
    "mini-mask-rcnn-swin": DetModel("mini_mask-rcnn_swin_fpn.py"),
    "mini-cascade-mask-rcnn-swin": DetModel("mini_cascade-mask-rcnn_swin_fpn.py", arch="cascade-mask-rcnn"),
}
_MMDET_URL = "https://download.openmmlab.com/mmdetection/v2.0/swin/"
FULL_MODELS = {
    "mask-rcnn_swin-t": DetModel(
        "mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py",
        _MMDET_URL + "mask_rcnn_swin-t-p4-w7_fpn_1x_coco/"
        "mask_rcnn_swin-t-p4-w7_fpn_1x_coco_20210902_120937-9d6b7cfa.pth"),
    "mask-rcnn_swin-s": DetModel(
        "mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py",
        _MMDET_URL + "mask_rcnn_swin-s-p4-w7_fpn_fp16_ms-crop-3x_coco/"
        "mask_rcnn_swin-s-p4-w7_fpn_fp16_ms-crop-3x_coco_20210903_104808-b92c91f1.pth"),
    # The Swin paper's Cascade Mask R-CNN (4conv1fc heads, GIoU): weights from the Swin authors'
    # release (original Swin key names, converted on load); no URL is wired in.
    "cascade-mask-rcnn_swin-t": DetModel("cascade-mask-rcnn_swin-t-p4-w7_fpn_4conv1f_giou_ms-3x_coco.py",
                                         arch="cascade-mask-rcnn"),
    "cascade-mask-rcnn_swin-s": DetModel("cascade-mask-rcnn_swin-s-p4-w7_fpn_4conv1f_giou_ms-3x_coco.py",
                                         arch="cascade-mask-rcnn"),
}
FULL_INPUT_SIZE = (800, 1344)  # test Resize(1333, 800, keep_ratio) padded to a multiple of 32


def _config_dir() -> Path:
    return Path(__file__).resolve().parent / "mini_dense" / "configs"


def _mm():
    """tasks.mm_common, or a one-line TaskError when the OpenMMLab stack is not installed."""
    try:
        from tasks import mm_common
    except ImportError as e:
        raise TaskError(f"det/seg need mmengine, mmcv (with ops), mmdet and mmseg ({e.name} missing): "
                        "pip install '.[mm]' (scripts/setup.sh builds mmcv)") from e
    return mm_common


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise TaskError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


class DenseTaskBase:
    """What the det and seg tasks share: model tables, loading, calibration images, evaluation."""

    name = ""
    scope = ""  # "mmdet" | "mmseg"
    primary_metric = ""
    mini_models: dict[str, DetModel] = {}
    full_models: dict[str, DetModel] = {}
    train_script = ""
    full_input_size: tuple[int, int] = (0, 0)
    OPTIONS = {"quant_scope": QUANT_SCOPES}  # tasks.base.task_options; first value is the default

    def __init__(self, data_root: str | Path | None = None, quant_scope: str = "backbone") -> None:
        root = data_root if data_root is not None else os.environ.get("VITQ_DATA")
        self.data_root = Path(root).expanduser() if root else None
        if quant_scope not in QUANT_SCOPES:
            raise TaskError(f"unknown quant scope {quant_scope!r}; valid: {', '.join(QUANT_SCOPES)}")
        self.quant_scope = quant_scope
        self._cfgs: dict[str, Any] = {}  # model name -> mmengine Config
        self._last_model: str | None = None
        self._datasets: dict[tuple, Any] = {}

    # ------------------------------------------------------------------ models

    def models(self, dataset: str) -> list[str]:
        _check_dataset(dataset)
        return list(self.mini_models if dataset == "mini" else self.full_models)

    def _model_entry(self, name: str, dataset: str) -> DetModel:
        table, other = ((self.mini_models, self.full_models) if dataset == "mini"
                        else (self.full_models, self.mini_models))
        if name in table:
            return table[name]
        if name in other:
            raise TaskError(f"{name} is a {'full' if dataset == 'mini' else 'mini'} model: "
                            f"use --dataset {'full' if dataset == 'mini' else 'mini'}")
        if dataset == "full" and (name.endswith(".py") or "::" in name):
            return DetModel(name)  # any mmdet/mmseg config, with --weights
        raise TaskError(f"unknown {self.name} model {name!r}; valid: {', '.join(table)}"
                        + ("" if dataset == "mini" else " or a config file / mmdet::... / mmseg::... config"))

    def config(self, name: str, dataset: str):
        """The mmengine Config of a model (cached); data roots point at the dataset in use."""
        key = f"{dataset}:{name}"
        if key not in self._cfgs:
            cfg = _mm().load_config(self._model_entry(name, dataset).config_spec())
            self._cfgs[key] = cfg
        return self._cfgs[key]

    def load(self, model_name: str, dataset: str, weights: str | None = None) -> QuantTarget:
        from methods.quant.surgery_mm import prepare_mm

        _check_dataset(dataset)
        mm = _mm()
        entry = self._model_entry(model_name, dataset)
        cfg = self.config(model_name, dataset)
        model = mm.build_model(cfg, self.scope)
        tag, source = self._load_weights(mm, model, model_name, dataset, entry, weights)
        prepare_mm(model.backbone)
        self._last_model = f"{dataset}:{model_name}"
        spec = self.input_spec(cfg, dataset)
        return QuantTarget(
            model=model.eval(), model_name=model_name,
            quant_path="backbone" if self.quant_scope == "backbone" else "",
            input_spec=spec, family="swin", logits=None, features=mm.backbone_features,
            num_classes=None,
            info={"weights": tag, "source": source, "dataset": dataset, "transform": spec.transform,
                  "config": entry.config, "quant_scope": self.quant_scope,
                  "classes": len(self._metainfo_classes(cfg))},
        )

    def _load_weights(self, mm, model: nn.Module, name: str, dataset: str, entry: DetModel,
                      weights: str | None) -> tuple[str, str]:
        if weights:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise TaskError(f"--weights file {path} does not exist")
            mm.load_weights(model, path, trusted=True)
            return f"file:{path.name}@sha256:{mm.sha256(path)}", f"file:{path}"
        if dataset == "mini":
            path = mm.WEIGHTS_DIR / f"{name}.pt"
            if not path.is_file():
                raise TaskError(f"mini checkpoint {path} is missing: run {self.train_script} --models {name}")
            mm.load_weights(model, path, trusted=False)
            return f"{name}.mini@sha256:{mm.sha256(path)}", f"file:{path}"
        if not entry.url:
            raise TaskError(f"no published checkpoint URL for {name}: pass its checkpoint with "
                            "--weights PATH")
        try:
            from mmengine.runner.checkpoint import CheckpointLoader

            ckpt = CheckpointLoader.load_checkpoint(entry.url, map_location="cpu")
        except Exception as e:  # offline / unreachable
            raise TaskError(f"cannot download {entry.url} ({type(e).__name__}; offline?): download it and "
                            "pass it with --weights PATH") from e
        mm.load_state(model, ckpt.get("state_dict", ckpt), entry.url)
        return f"url:{entry.url.rsplit('/', 1)[-1]}", entry.url

    # ------------------------------------------------------------------ data

    def input_spec(self, cfg, dataset: str) -> InputSpec:
        pre = cfg.model.data_preprocessor
        mean = tuple(float(m) / 255.0 for m in pre.mean)
        std = tuple(float(s) / 255.0 for s in pre.std)
        if pre.get("bgr_to_rgb", False) is False and pre.get("rgb_to_bgr", False) is False:
            order = "BGR"  # files are read as BGR and not swapped
        else:
            order = "RGB"
        size = tuple(cfg.get("image_size", cfg.get("crop_size", (128, 128)))) if dataset == "mini" \
            else self.full_input_size
        steps = " -> ".join(t["type"] + (f"{tuple(t['scale'])}" if "scale" in t else "")
                            for t in self._test_pipeline(cfg) if "Annotations" not in t["type"])
        transform = (f"{self.scope} test pipeline: {steps} -> {pre.type}({order}, mean={pre.mean}, "
                     f"std={pre.std}) -> padded to {size[0]}x{size[1]}")
        return InputSpec(image_size=(int(size[0]), int(size[1])), in_chans=3, mean=mean, std=std,
                         transform=transform)

    @staticmethod
    def _test_pipeline(cfg) -> list[dict]:
        return [dict(t) for t in cfg.test_dataloader.dataset.pipeline]

    @staticmethod
    def _metainfo_classes(cfg) -> tuple:
        meta = cfg.test_dataloader.dataset.get("metainfo") or {}
        return tuple(meta.get("classes", ())) or tuple(cfg.get("metainfo", {}).get("classes", ())) or \
            tuple(range(_num_classes(cfg)))

    def _current_cfg(self, dataset: str):
        if self._last_model is None or not self._last_model.startswith(dataset + ":"):
            if dataset == "mini":  # every mini model shares one data config
                return self.config(next(iter(self.mini_models)), "mini")
            raise TaskError(f"{self.name}: call load() with a {dataset} model before calibration/evaluation")
        return self._cfgs[self._last_model]

    def calibration(self, dataset: str, n: int, seed: int) -> torch.Tensor:
        """``n`` real images (n, 3, H, W) through the model's test pipeline and data_preprocessor,
        from a split disjoint from the evaluation set, chosen by ``seed``."""
        _check_dataset(dataset)
        mm = _mm()
        cfg = self._current_cfg(dataset)
        paths = self._calibration_pool(dataset)
        if n > len(paths):
            raise TaskError(f"{self.name} calibration pool has {len(paths)} images, asked for {n}")
        idx = np.sort(np.random.default_rng(seed).choice(len(paths), n, replace=False))
        spec = self.input_spec(cfg, dataset)
        pre = mm.build_data_preprocessor(cfg, self.scope)
        return mm.preprocess_images(pre, [paths[i] for i in idx], self._test_pipeline(cfg), self.scope,
                                    pad_to=spec.image_size)

    def evaluate(self, model: nn.Module, dataset: str,
                 device: torch.device | str = "cpu") -> dict[str, float]:
        _check_dataset(dataset)
        mm = _mm()
        cfg = self._current_cfg(dataset)
        ds = self._eval_dataset(cfg, dataset)
        return self._metrics(mm.evaluate(model, ds, self._metric_cfg(cfg, dataset), self.scope,
                                         torch.device(device), batch_size=10))

    def _eval_dataset(self, cfg, dataset: str):
        key = (dataset, id(cfg))
        if key not in self._datasets:
            self._datasets[key] = _mm().build_dataset(self._eval_dataset_cfg(cfg, dataset), self.scope)
        return self._datasets[key]

    def _calibration_pool(self, dataset: str) -> list[Path]:
        """The images calibration draws from (disjoint from the evaluation split)."""
        folder = self._calibration_folder(dataset)
        paths = sorted(folder.glob("*.jpg"))
        if not paths:
            raise TaskError(f"no calibration images in {folder}"
                            + (": run scripts/make_mini_dense_data.py" if dataset == "mini" else ""))
        return paths

    # subclass hooks
    def _calibration_folder(self, dataset: str) -> Path: ...
    def _eval_dataset_cfg(self, cfg, dataset: str) -> dict: ...
    def _metric_cfg(self, cfg, dataset: str) -> dict: ...
    def _metrics(self, raw: dict[str, float]) -> dict[str, float]: ...

    def dataset_info(self, dataset: str, model: str | None = None) -> dict[str, Any]:
        """Sizes and location of the evaluation / calibration data (``model``: unused, every model of the
        task sees the same data)."""
        cfg = self._current_cfg(dataset)
        ds = self._eval_dataset(cfg, dataset)
        return {"name": self._dataset_name(dataset), "eval_images": len(ds),
                "eval_root": str(self._eval_dataset_cfg(cfg, dataset)["data_root"]),
                "calib_pool": len(self._calibration_pool(dataset))}

    def _dataset_name(self, dataset: str) -> str: ...

    def _root(self, candidates: list[str], probe: str, what: str) -> Path:
        if self.data_root is None:
            raise TaskError(f"{what} not found: set --data-root or VITQ_DATA (expected <root>/{probe})")
        for c in candidates:
            if (self.data_root / c / probe).exists():
                return self.data_root / c
        raise TaskError(f"{what} not found: expected {self.data_root}/{probe}")


def _num_classes(cfg) -> int:
    head = cfg.model.get("roi_head", {}).get("bbox_head") or cfg.model.get("decode_head")
    head = head[0] if isinstance(head, list) else head
    return int(head["num_classes"])


@register_task("det")
class DetectionTask(DenseTaskBase):
    """COCO-style detection + instance segmentation (``bbox_mAP``, ``segm_mAP`` in percent)."""

    name = "det"
    scope = "mmdet"
    primary_metric = "bbox_mAP"
    mini_models = MINI_MODELS
    full_models = FULL_MODELS
    train_script = "scripts/train_mini_det.py"
    full_input_size = FULL_INPUT_SIZE

    def _coco_root(self, dataset: str) -> Path:
        if dataset == "mini":
            return _mm().DATA_DIR / "mini-coco"
        return self._root(["", "coco"], "annotations/instances_val2017.json", "COCO val2017")

    def _eval_dataset_cfg(self, cfg, dataset: str) -> dict:
        ds = cfg.test_dataloader.dataset.to_dict()
        ds["data_root"] = str(self._coco_root(dataset))
        ds["ann_file"] = "annotations/instances_val2017.json"
        ds["data_prefix"] = dict(img="val2017/")
        ds["test_mode"] = True
        return ds

    def _metric_cfg(self, cfg, dataset: str) -> dict:
        metric = cfg.test_evaluator.to_dict()
        metric["ann_file"] = str(self._coco_root(dataset) / "annotations" / "instances_val2017.json")
        metric["metric"] = ["bbox", "segm"]
        metric.pop("outfile_prefix", None)
        metric["format_only"] = False
        return metric

    def _metrics(self, raw: dict[str, float]) -> dict[str, float]:
        missing = [k for k in METRICS if k not in raw]
        if missing:
            raise TaskError(f"CocoMetric returned no {', '.join(missing)}")
        return {k: round(100.0 * raw[k], 2) for k in METRICS}

    def _calibration_folder(self, dataset: str) -> Path:
        return self._coco_root(dataset) / ("calib2017" if dataset == "mini" else "train2017")

    def _dataset_name(self, dataset: str) -> str:
        return "mini-coco" if dataset == "mini" else "coco-val2017"
