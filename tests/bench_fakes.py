"""Fake methods and a fake task for the harness tests (no real models, milliseconds per job).

``install(monkeypatch)`` swaps the method and task registries for fresh ones holding only
these fakes (no built-ins, no entry points), so the harness is tested on its own.
Subprocess tests load this file with ``--plugin tests/bench_fakes.py:install``.
Every call is counted in ``CALLS`` so tests can check what a run executed.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

import methods.base as mb
import tasks.base as tb
from methods.base import QuantMethod, RunContext
from methods.quant.bits import BitSpec
from methods.quant.registry import Registry
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
    data_free = True

    @dataclass
    class Config:
        pass

    provenance = {"identity": "choice: the FP model itself"}
    summary = "full precision reference"

    def quantize(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> nn.Module:
        CALLS["quantize:fp"] += 1
        ctx.record_quantization(bits)
        return target.model


@dataclass
class ToyPTQConfig:
    calib_size: int = 32
    clip: float = 1.0
    layers: tuple[str, ...] = ("fc",)


class ToyPTQ(QuantMethod):
    data_free = False
    Config = ToyPTQConfig
    PROFILES = {"ci": {"calib_size": 4}}
    provenance = {"quantizer": "choice: symmetric per-tensor", "calibration": "paper: min-max"}
    summary = "toy PTQ with real calibration images"

    def quantize(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> nn.Module:
        CALLS[f"quantize:{self.name}"] += 1
        if self.name in FAIL_METHOD:
            raise RuntimeError("boom inside the method")
        assert ctx.calibration is not None, "PTQ method must get calibration data"
        with ctx.timer("calibration"):
            images = ctx.calibration(self.config.calib_size)
        CALLS[f"calib_n:{images.shape[0]}"] += 1
        policy = {"name": "toy", "rules": [{"kind": "linear", "names": ["fc"]}]}
        ctx.record_quantization(bits.resolve(["fc"]), policy)
        ctx.note("toy ptq ran")
        return _fake_quant(target.model, bits.w_bits or 8)


class ToyDFQ(QuantMethod):
    data_free = True

    @dataclass
    class Config:
        steps: int = 100
        noise: float = 0.05

    PROFILES = {"ci": {"steps": 3}}
    provenance = {"generation": "reconstructed: seeded noise", "quantizer": "code-verified: as ToyPTQ"}
    summary = "toy data-free method (seed-dependent)"

    def quantize(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> nn.Module:
        CALLS[f"quantize:{self.name}"] += 1
        CALLS[f"dfq_calibration_is_none:{ctx.calibration is None}"] += 1
        with ctx.timer("generation"):
            noise = self.config.noise * torch.randn(4, 8, generator=ctx.generator())
        ctx.record_quantization(bits.resolve(["fc"]), {"name": "toy-dfq"})
        ctx.extra["synthetic_images"] = 0
        return _fake_quant(target.model, bits.w_bits or 8, noise)


def install(monkeypatch=None) -> None:
    """Replace the registries with the fakes only (monkeypatch in-process, plain setattr in a subprocess)."""
    set_ = monkeypatch.setattr if monkeypatch is not None else setattr
    set_(mb, "_METHODS", {})
    set_(mb, "_loaded", True)
    set_(tb, "TASKS", Registry("task", validate=tb.TASKS.validate))  # no built-ins, no entry points
    # Fresh subclasses each time: register_method sets cls.name, which must not leak between installs.
    mb.register_method("fp")(type("FP", (FakeFP,), {}))
    mb.register_method("toy-ptq")(type("ToyPTQ_", (ToyPTQ,), {}))
    mb.register_method("toy-dfq")(type("ToyDFQ_", (ToyDFQ,), {}))
    tb.TASKS.register("toy")(ToyTask)
    CALLS.clear()
