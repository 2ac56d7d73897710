"""What the mmdet (det) and mmseg (seg) tasks share: model tables, loading, calibration, evaluation.

This module imports no OpenMMLab package, so the registry and ``bench list`` work without the mm
stack: :func:`mm_stack` imports :mod:`tasks.mm.openmmlab` when a model is built and turns a missing
package into a one-line TaskError.

The QuantTarget quantizes the backbone by default (``quant_scope="all"``: the whole model, neck and
heads included). Calibration and evaluation read the model's mmengine Config from the handle.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from methods.quant.target import InputSpec, QuantTarget
from tasks.base import Task, TaskError, TaskHandle, check_dataset, file_sha256

MINI_DIR = Path(__file__).resolve().parents[1] / "mini_dense"  # vendored mini data, weights, configs
CONFIG_DIR = MINI_DIR / "configs"
WEIGHTS_DIR = MINI_DIR / "weights"
DATA_DIR = MINI_DIR / "data"
QUANT_SCOPES = ("backbone", "all")


@dataclass(frozen=True)
class MMModel:
    """One entry of a model table: an mmdet/mmseg config and where its weights come from."""

    config: str  # file in tasks/mini_dense/configs, or an mmdet::... / mmseg::... library config
    url: str | None = None  # published checkpoint (full models)
    arch: str = ""  # architecture label ("mask-rcnn", "cascade-mask-rcnn", "upernet")

    def config_spec(self) -> str:
        return self.config if "::" in self.config else str(CONFIG_DIR / self.config)


def mm_stack() -> ModuleType:
    """tasks.mm.openmmlab, or a one-line TaskError when the OpenMMLab stack is not installed."""
    try:
        from tasks.mm import openmmlab
    except ImportError as e:
        raise TaskError(f"det/seg need mmengine, mmcv (with ops), mmdet and mmseg ({e.name} missing): "
                        "pip install '.[mm]' (scripts/setup.sh builds mmcv)") from e
    return openmmlab


class MMTask(Task):
    """A task on an OpenMMLab model family; subclasses give the tables, data layout and metrics."""

    scope: ClassVar[str] = ""  # "mmdet" | "mmseg"
    mini_models: ClassVar[dict[str, MMModel]] = {}
    full_models: ClassVar[dict[str, MMModel]] = {}
    train_script: ClassVar[str] = ""
    full_input_size: ClassVar[tuple[int, int]] = (0, 0)
    OPTIONS = {"quant_scope": QUANT_SCOPES}

    def __init__(self, data_root: str | Path | None = None, **options: str) -> None:
        super().__init__(data_root, **options)
        self.quant_scope = self.options["quant_scope"]
        # pure caches: a parsed Config per model, a built eval dataset per dataset config
        self._cfgs: dict[str, Any] = {}
        self._datasets: dict[str, Any] = {}

    # ------------------------------------------------------------------ models

    def models(self, dataset: str) -> list[str]:
        check_dataset(dataset)
        return list(self.mini_models if dataset == "mini" else self.full_models)

    def _model_entry(self, name: str, dataset: str) -> MMModel:
        table, other = ((self.mini_models, self.full_models) if dataset == "mini"
                        else (self.full_models, self.mini_models))
        if name in table:
            return table[name]
        if name in other:
            raise TaskError(f"{name} is a {'full' if dataset == 'mini' else 'mini'} model: "
                            f"use --dataset {'full' if dataset == 'mini' else 'mini'}")
        if dataset == "full" and (name.endswith(".py") or "::" in name):
            return MMModel(name)  # any mmdet/mmseg config, with --weights
        raise TaskError(f"unknown {self.name} model {name!r}; valid: {', '.join(table)}"
                        + ("" if dataset == "mini" else " or a config file / mmdet::... / mmseg::... config"))

    def config(self, name: str, dataset: str):
        """The mmengine Config of a model (cached)."""
        key = f"{dataset}:{name}"
        if key not in self._cfgs:
            self._cfgs[key] = mm_stack().load_config(self._model_entry(name, dataset).config_spec())
        return self._cfgs[key]

    def load(self, model_name: str, dataset: str, weights: str | None = None) -> TaskHandle:
        from methods.quant.surgery_mm import prepare_mm

        check_dataset(dataset)
        mm = mm_stack()
        entry = self._model_entry(model_name, dataset)
        cfg = self.config(model_name, dataset)
        model = mm.build_model(cfg, self.scope)
        tag, source = self._load_weights(mm, model, model_name, dataset, entry, weights)
        prepare_mm(model.backbone)
        spec = self.input_spec(cfg, dataset)
        target = QuantTarget(
            model=model.eval(), model_name=model_name,
            quant_path="backbone" if self.quant_scope == "backbone" else "",
            input_spec=spec, family="swin", logits=None, features=mm.backbone_features,
            num_classes=None,
            info={"weights": tag, "source": source, "dataset": dataset, "transform": spec.transform,
                  "config": entry.config, "quant_scope": self.quant_scope,
                  "classes": len(self._metainfo_classes(cfg))},
        )
        # the test pipeline is config data run inside mmengine, not a callable: the handle carries
        # its description and calibration/evaluation rebuild it from the Config
        return TaskHandle(target=target, dataset=dataset, data_config=cfg, transform=spec.transform)

    def _load_weights(self, mm: ModuleType, model: nn.Module, name: str, dataset: str, entry: MMModel,
                      weights: str | None) -> tuple[str, str]:
        if weights:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise TaskError(f"--weights file {path} does not exist")
            mm.load_weights(model, path, trusted=True)
            return f"file:{path.name}@sha256:{file_sha256(path)}", f"file:{path}"
        if dataset == "mini":
            path = WEIGHTS_DIR / f"{name}.pt"
            if not path.is_file():
                raise TaskError(f"mini checkpoint {path} is missing: run {self.train_script} --models {name}")
            mm.load_weights(model, path, trusted=False)
            return f"{name}.mini@sha256:{file_sha256(path)}", f"file:{path}"
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

    def calibration(self, handle: TaskHandle, n: int, seed: int) -> torch.Tensor:
        """``n`` real images (n, 3, H, W) through the model's test pipeline and data_preprocessor,
        from a split disjoint from the evaluation set, chosen by ``seed``."""
        mm = mm_stack()
        cfg = handle.data_config
        paths = self._calibration_pool(handle.dataset)
        if n > len(paths):
            raise TaskError(f"{self.name} calibration pool has {len(paths)} images, asked for {n}")
        idx = np.sort(np.random.default_rng(seed).choice(len(paths), n, replace=False))
        spec = self.input_spec(cfg, handle.dataset)
        pre = mm.build_data_preprocessor(cfg, self.scope)
        return mm.preprocess_images(pre, [paths[i] for i in idx], self._test_pipeline(cfg), self.scope,
                                    pad_to=spec.image_size)

    def evaluate(self, handle: TaskHandle, model: nn.Module,
                 device: torch.device | str = "cpu") -> dict[str, float]:
        mm = mm_stack()
        cfg = handle.data_config
        ds = self._eval_dataset(cfg, handle.dataset)
        return self._metrics(mm.evaluate(model, ds, self._metric_cfg(cfg, handle.dataset), self.scope,
                                         torch.device(device), batch_size=10))

    def _eval_dataset(self, cfg, dataset: str):
        """The built evaluation dataset of a Config, cached by the dataset config itself (models whose
        test data is configured alike share one)."""
        ds_cfg = self._eval_dataset_cfg(cfg, dataset)
        key = json.dumps(ds_cfg, sort_keys=True, default=str)
        if key not in self._datasets:
            self._datasets[key] = mm_stack().build_dataset(ds_cfg, self.scope)
        return self._datasets[key]

    def _calibration_pool(self, dataset: str) -> list[Path]:
        """The images calibration draws from (disjoint from the evaluation split)."""
        folder = self._calibration_folder(dataset)
        paths = sorted(folder.glob("*.jpg"))
        if not paths:
            raise TaskError(f"no calibration images in {folder}"
                            + (": run scripts/make_mini_dense_data.py" if dataset == "mini" else ""))
        return paths

    def dataset_info(self, handle: TaskHandle) -> dict[str, Any]:
        """Sizes and location of the evaluation / calibration data."""
        cfg = handle.data_config
        ds = self._eval_dataset(cfg, handle.dataset)
        return {"name": self._dataset_name(handle.dataset), "eval_images": len(ds),
                "eval_root": str(self._eval_dataset_cfg(cfg, handle.dataset)["data_root"]),
                "calib_pool": len(self._calibration_pool(handle.dataset))}

    def _root(self, candidates: list[str], probe: str, what: str) -> Path:
        if self.data_root is None:
            raise TaskError(f"{what} not found: set --data-root or VITQ_DATA (expected <root>/{probe})")
        for c in candidates:
            if (self.data_root / c / probe).exists():
                return self.data_root / c
        raise TaskError(f"{what} not found: expected {self.data_root}/{probe}")

    # ------------------------------------------------------------------ subclass hooks

    @abstractmethod
    def _calibration_folder(self, dataset: str) -> Path:
        """Folder of the calibration images (``*.jpg``)."""

    @abstractmethod
    def _eval_dataset_cfg(self, cfg, dataset: str) -> dict:
        """The evaluation dataset config (a dict for the library's DATASETS registry)."""

    @abstractmethod
    def _metric_cfg(self, cfg, dataset: str) -> dict:
        """The evaluator config (a dict for the library's METRICS registry)."""

    @abstractmethod
    def _metrics(self, raw: dict[str, float]) -> dict[str, float]:
        """The task's metrics, in percent, from the evaluator's results."""

    @abstractmethod
    def _dataset_name(self, dataset: str) -> str:
        """The evaluation set's name for records."""


def _num_classes(cfg) -> int:
    head = cfg.model.get("roi_head", {}).get("bbox_head") or cfg.model.get("decode_head")
    head = head[0] if isinstance(head, list) else head
    return int(head["num_classes"])
