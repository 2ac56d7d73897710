"""The Task interface and the task registry.

A task owns models, data and metrics for one problem (cls / det / seg). It hands
methods a :class:`~methods.quant.target.QuantTarget` and evaluates whatever
model comes back. Tasks never import methods (only ``methods.quant``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from methods.quant.target import QuantTarget

DATASETS = ("mini", "full")


class TaskError(RuntimeError):
    """A user-facing problem (missing weights, missing data): one line, says the fix."""


@runtime_checkable
class Task(Protocol):
    name: str
    primary_metric: str  # the metric tables lead with, e.g. "top1"

    def models(self, dataset: str) -> list[str]: ...

    def load(self, model_name: str, dataset: str, weights: str | None = None) -> QuantTarget: ...

    def calibration(self, dataset: str, n: int, seed: int) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, dataset: str, device: torch.device) -> dict[str, float]: ...


_TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.name = name
        _TASKS[name] = cls
        return cls

    return deco


def available_tasks() -> list[str]:
    _load_builtin()
    return list(_TASKS)


def task_options(name: str) -> dict[str, tuple[str, ...]]:
    """Options a task accepts (``OPTIONS`` class attribute: name -> valid values, first = default)."""
    _load_builtin()
    return dict(getattr(_TASKS[name], "OPTIONS", {}))


def get_task(name: str, data_root: str | Path | None = None, **options: str) -> Task:
    _load_builtin()
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; valid: {', '.join(_TASKS)}")
    return _TASKS[name](data_root=data_root, **options)


def _load_builtin() -> None:
    import tasks.cls  # noqa: F401  (registers "cls")
    import tasks.det  # noqa: F401  (registers "det"; mmdet is imported only when a det model loads)
    import tasks.seg  # noqa: F401  (registers "seg")
