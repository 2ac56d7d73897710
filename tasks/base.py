"""The Task interface, the handle a load returns, the task registry and the one file-hash helper.

A task owns models, data and metrics for one problem (cls / det / seg). ``load()`` returns a
:class:`TaskHandle`: the :class:`~methods.quant.target.QuantTarget` methods quantize, plus what
calibration and evaluation need. Those two take the handle, so a task keeps no per-model state and
two models loaded in any order calibrate and evaluate as if each were alone. Tasks never import
methods (only ``methods.quant``).

This module imports no task: the registry lists the built-ins by module and imports one only when
it is asked for (so ``bench list`` never imports the OpenMMLab stack, and there is no import circle).
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from methods.quant.registry import Registry
from methods.quant.target import QuantTarget

DATASETS = ("mini", "full")


class TaskError(RuntimeError):
    """A user-facing problem (missing weights, missing data): one line, says the fix."""


@dataclass(frozen=True)
class TaskHandle:
    """What load() returns: the target plus everything calibration/evaluation need (no task state)."""

    target: QuantTarget
    dataset: str  # "mini" | "full"
    data_config: Any  # cls: the timm data config dict; det/seg: the model's mmengine Config
    transform: Any  # the eval transform (or its one-line description where no callable exists)


class Task(ABC):
    """One problem: its models, data and metrics. Subclasses register with ``@register_task(name)``."""

    name: ClassVar[str] = ""
    primary_metric: ClassVar[str] = ""  # the metric tables lead with, e.g. "top1"
    OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {}  # option -> valid values, first = default

    def __init__(self, data_root: str | Path | None = None, **options: str) -> None:
        root = data_root if data_root is not None else os.environ.get("VITQ_DATA")
        self.data_root: Path | None = Path(root).expanduser() if root else None
        for key, value in options.items():
            if key not in self.OPTIONS:
                valid = ", ".join(self.OPTIONS) or "none"
                raise TaskError(f"task {self.name!r} has no option {key!r} (options: {valid})")
            if value not in self.OPTIONS[key]:
                raise TaskError(f"unknown {key.replace('_', ' ')} {value!r}; "
                                f"valid: {', '.join(self.OPTIONS[key])}")
        self.options: dict[str, str] = {k: options.get(k, v[0]) for k, v in self.OPTIONS.items()}

    # ------------------------------------------------------------------ models

    @abstractmethod
    def models(self, dataset: str) -> list[str]:
        """The models of ``dataset`` in the default grid."""

    def optional_models(self, dataset: str) -> list[str]:
        """Models run only when named with --models (not in the default grid)."""
        return []

    def unavailable_models(self, dataset: str) -> dict[str, str]:
        """Optional models that cannot run here: {name: one-line reason with the fix}."""
        return {}

    def weights_tag(self, model: str, dataset: str, weights: str | None) -> str:
        """The weights part of a job key: "default" for the task's own weights, else the file's name and
        content hash (a renamed copy keeps its results)."""
        return "default" if weights is None else f"{Path(weights).name}@sha256:{file_sha256(weights)}"

    @abstractmethod
    def load(self, model_name: str, dataset: str, weights: str | None = None) -> TaskHandle:
        """Build the model (prepared by surgery, eval mode) and everything needed to feed and score it."""

    # ------------------------------------------------------------------ data and metrics

    @abstractmethod
    def calibration(self, handle: TaskHandle, n: int, seed: int) -> torch.Tensor:
        """``n`` real images (n, C, H, W) for ``handle``'s model, disjoint from the evaluation set,
        chosen by ``seed``."""

    @abstractmethod
    def evaluate(self, handle: TaskHandle, model: nn.Module,
                 device: torch.device | str = "cpu") -> dict[str, float]:
        """The metrics (percent) of ``model`` (``handle``'s model or a quantized copy) on the whole
        evaluation set of ``handle.dataset``."""

    def dataset_info(self, handle: TaskHandle) -> dict[str, Any]:
        """Sizes and provenance of the evaluation / calibration data, for result records."""
        return {}


def check_dataset(dataset: str) -> None:
    """TaskError unless ``dataset`` is one of :data:`DATASETS`."""
    if dataset not in DATASETS:
        raise TaskError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


# --------------------------------------------------------------------------- file hashes


def file_sha256(path: str | Path, n: int = 12) -> str:
    """The first ``n`` hex digits of the SHA-256 of a file's bytes.

    Cached by (path, size, mtime): the ~90 MB DINOv2 ONNX file is read once per process, while a
    file rewritten in place (a retrained checkpoint) is hashed again.
    """
    st = os.stat(path)
    return _sha256_hex(os.path.abspath(path), st.st_size, st.st_mtime_ns)[:n]


@lru_cache(maxsize=64)
def _sha256_hex(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- registry


TASKS: Registry[type[Task]] = Registry(
    "task",
    builtins={"cls": "tasks.cls", "det": "tasks.mm.det", "seg": "tasks.mm.seg"},
    entry_point_group="vitq_bench.tasks",
    base=Task,
)
register_task = TASKS.register


def get_task(name: str, data_root: str | Path | None = None, **options: str) -> Task:
    """An instance of the task ``name``; an unknown name raises ``UnknownName`` (with a did-you-mean)."""
    return TASKS.get(name)(data_root=data_root, **options)


def task_options(name: str) -> dict[str, tuple[str, ...]]:
    """Options a task accepts (``OPTIONS``: name -> valid values, first = default)."""
    return dict(TASKS.get(name).OPTIONS)
