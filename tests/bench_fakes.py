"""Fake methods and a fake task for the harness tests (no real models, milliseconds per job).

``with installed():`` leaves only these fakes in the method and task registries, and only the real and
noise data sources (no built-ins, no entry points), so the harness is tested on its own.
Subprocess tests load this file with ``--plugin tests/bench_fakes.py:install``.
Every call is counted in ``CALLS`` so tests can check what a run executed.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

import methods.base as mb
import tasks.base as tb
from methods.base import Built, QuantMethod, QuantResult, RunContext
from methods.data import SOURCES, GaussianNoise, RealImages
from methods.quant.bits import BitSpec
from methods.quant.target import InputSpec, QuantTarget
from tasks.base import Task, TaskError, TaskHandle

CALLS: Counter[str] = Counter()
MODELS = {"mini": ["toy-a", "toy-b"], "full": ["toy-a", "toy-nodata"]}
FAIL_METHOD = {"toy-broken"}  # methods whose quantize raises (a bug inside one job)


class ToyNet(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(4, 8, generator=g))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class ToyTask(Task):
    name = "toy"
    primary_metric = "top1"
    OPTIONS = {"quant_scope": ("backbone", "all")}  # like det/seg: --quant-scope applies

    def __init__(self, data_root: str | None = None, quant_scope: str = "backbone") -> None:
        super().__init__(data_root, quant_scope=quant_scope)
        self.data_root = data_root  # as given: the error message names it (or $VITQ_DATA) verbatim
        self.quant_scope = quant_scope

    def models(self, dataset: str) -> list[str]:
        return list(MODELS[dataset])

    def load(self, model_name: str, dataset: str, weights: str | None = None) -> TaskHandle:
        CALLS["load"] += 1
        if model_name == "toy-nodata":
            raise TaskError(
                f"weights for {model_name} not found: put toy.pth under {self.data_root or '$VITQ_DATA'}"
            )
        model = ToyNet(seed=sum(map(ord, model_name))).eval()
        spec = InputSpec(image_size=(2, 2), in_chans=2, mean=(0.5, 0.5), std=(0.25, 0.25))
        target = QuantTarget(
            model=model,
            model_name=model_name,
            quant_path="",
            input_spec=spec,
            family="vit",
            logits=lambda m, x: m(x),
            num_classes=4,
            info={"weights": weights or "builtin", "quant_scope": self.quant_scope},
        )
        return TaskHandle(target=target, dataset=dataset, data_config={}, transform="identity")

    def calibration(self, handle: TaskHandle, n: int, seed: int) -> torch.Tensor:
        CALLS["calibration"] += 1
        return torch.randn(n, 2, 2, 2, generator=torch.Generator().manual_seed(seed))

    def evaluate(self, handle: TaskHandle, model: nn.Module,
                 device: torch.device | str = "cpu") -> dict[str, float]:
        CALLS["evaluate"] += 1
        x = torch.randn(64, 2, 2, 2, generator=torch.Generator().manual_seed(123))
        with torch.no_grad():
            err = float(model.fc.weight.abs().mean())  # a deterministic function of the (quantized) weights
            out = model(x)
        top1 = round(100.0 * float((out.argmax(1) == 0).float().mean()) + err, 6)
        return {"top1": top1, "top5": round(top1 / 2 + 50.0, 6)}


def _fake_quant(model: nn.Module, bits: int, noise: torch.Tensor | None = None) -> nn.Module:
    q = copy.deepcopy(model)
    with torch.no_grad():
        w = q.fc.weight
        if noise is not None:
            w.add_(noise)
        scale = w.abs().max() / (2 ** (bits - 1) - 1)
        w.copy_((w / scale).round() * scale)
    return q


class FakeFP(QuantMethod):
    """The template's FP path (bits=fp returns the task's model), counted."""

    data_free = True
    summary = "full precision reference"

    def quantize(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> QuantResult:
        CALLS["quantize:fp"] += 1
        return super().quantize(target, bits, ctx)


@dataclass
class FakeFPConfig:
    pass


@dataclass
class ToyPTQConfig:
    calib_size: int = 32
    clip: float = 1.0
    layers: tuple[str, ...] = ("fc",)
    data_source: str | None = None


class ToyPTQ(QuantMethod):
    """Hooks only: real images from the template, a hand-rolled weight rounding as the build."""

    data_free = False
    summary = "toy PTQ with real calibration images"

    def num_images(self, target: QuantTarget) -> int:
        return self.config.calib_size

    def calibration_data(self, target: QuantTarget, ctx: RunContext) -> torch.Tensor:
        CALLS[f"quantize:{self.name}"] += 1
        if self.name in FAIL_METHOD:
            raise RuntimeError("boom inside the method")
        images = super().calibration_data(target, ctx)
        CALLS[f"calib_n:{images.shape[0]}"] += 1
        return images

    def build(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> Built:
        model = _fake_quant(target.model, bits.w_bits or 8)
        ctx.note("toy ptq ran")
        policy = {"name": "toy", "rules": [{"kind": "linear", "names": ["fc"]}]}
        return Built(model, model, bits.resolve(["fc"]), policy)

    def calibrate(self, built: Built, images: torch.Tensor, target: QuantTarget, ctx: RunContext) -> None:
        """Weights only: nothing to calibrate."""


@dataclass
class ToyDFQConfig:
    steps: int = 100
    noise: float = 0.05
    data_source: str | None = None


class ToyDFQ(ToyPTQ):
    """A seed-dependent data-free toy: noise images, and the build perturbs the weights by seeded noise."""

    data_free = True
    data_source = "noise"
    summary = "toy data-free method (seed-dependent)"

    def num_images(self, target: QuantTarget) -> int:
        return 4

    def calibration_data(self, target: QuantTarget, ctx: RunContext) -> torch.Tensor:
        CALLS[f"quantize:{self.name}"] += 1
        return QuantMethod.calibration_data(self, target, ctx)

    def build(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> Built:
        noise = self.config.noise * torch.randn(4, 8, generator=ctx.generator(1))
        ctx.extra["synthetic_images"] = 0
        model = _fake_quant(target.model, bits.w_bits or 8, noise)
        return Built(model, model, bits.resolve(["fc"]), {"name": "toy-dfq"})


FAKE_METHODS = {
    "fp": (FakeFP, FakeFPConfig, {}, {"identity": "choice: the FP model itself"}),
    "toy-ptq": (ToyPTQ, ToyPTQConfig, {"ci": {"calib_size": 4}},
                {"quantizer": "choice: symmetric per-tensor", "calibration": "paper: min-max"}),
    "toy-dfq": (ToyDFQ, ToyDFQConfig, {"ci": {"steps": 3}},
                {"generation": "reconstructed: seeded noise", "quantizer": "code-verified: as ToyPTQ"}),
}


def register_fake(name: str, base: type) -> type:
    """A fresh subclass of a fake registered under ``name`` (register sets cls.name: no leaks)."""
    cls, config, profiles, provenance = FAKE_METHODS.get(name, FAKE_METHODS["toy-ptq"])
    sub = type(f"{base.__name__}_{name}", (base,), {})
    return mb.register_method(name, config=config, profiles=profiles, provenance=provenance)(sub)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Only the fakes in the method and task registries (no built-ins, no entry points) inside."""
    with mb.METHODS.isolated(), tb.TASKS.isolated(), SOURCES.isolated():
        SOURCES.add("real", RealImages)  # the harness's own sources; no generator method is loaded
        SOURCES.add("noise", GaussianNoise)
        for name, (cls, *_rest) in FAKE_METHODS.items():
            register_fake(name, cls)
        tb.TASKS.register("toy")(ToyTask)
        CALLS.clear()
        yield


_INSTALLED = contextlib.ExitStack()


def install() -> None:
    """``--plugin tests/bench_fakes.py:install``: the fakes only, for the rest of the process."""
    _INSTALLED.enter_context(installed())
