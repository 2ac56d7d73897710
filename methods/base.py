"""The Quantizer interface, the method registry and the per-job RunContext.

A method is a class decorated with ``@register_method("name")`` that has
``data_free``, a ``Config`` dataclass (defaults = the paper's settings), a
``PROFILES`` dict of overrides per profile ("ci", "fast"), a ``provenance`` dict
(component -> "code-verified" | "paper" | "reconstructed" | "choice", with a
short note), and ``quantize(target, bits, ctx) -> nn.Module``.

Third-party methods register through the ``vitq_bench.methods`` entry-point
group: each entry point names a module (or object) whose import registers it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from methods.quant.bits import BitSpec
from methods.quant.target import QuantTarget
from methods.synth.artifacts import tensor_sha256

KNOWN_PROFILES = ("paper", "fast", "ci")
PROVENANCE_LEVELS = ("code-verified", "paper", "reconstructed", "choice")
BUILTIN_MODULES = ("methods.baselines", "methods.psaq_vit_v2", "methods.mimiq")
ENTRY_POINT_GROUP = "vitq_bench.methods"


@dataclass
class RunContext:
    """Everything a method may use from the harness for one job."""

    device: torch.device
    seed: int
    profile: str
    cache_dir: Path
    artifacts_dir: Path
    calibration: Callable[[int], torch.Tensor] | None = None  # n -> real images (N,C,H,W); PTQ only
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("vitq"))
    progress: Callable[[str], None] = lambda msg: None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific record fields
    # Set by the method (via record_quantization): what actually ran, for the result record.
    resolved_bits: BitSpec | None = None
    policy: dict[str, Any] | None = None
    # name -> SHA-256 of each synthetic batch the method used (record_images): same machine and threads,
    # same hashes; a changed hash with equal metrics still says the images moved
    image_hashes: dict[str, str] = field(default_factory=dict)

    def record_quantization(self, bits: BitSpec, policy: dict[str, Any] | None = None) -> None:
        """Report the per-layer bits (resolved BitSpec) and the policy (as data) the method applied."""
        self.resolved_bits = bits
        self.policy = policy

    def record_images(self, name: str, images: torch.Tensor) -> None:
        """Record the SHA-256 of a synthetic (or calibration) batch under ``name`` for the result record."""
        self.image_hashes[name] = tensor_sha256(images)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the job seed (offset separates independent streams)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)

    @contextlib.contextmanager
    def timer(self, phase: str) -> Iterator[None]:
        """Accumulate wall time of a phase ("generation", "calibration", "finetune", ...)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t0

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            self.log.info(text)


@runtime_checkable
class Quantizer(Protocol):
    name: str
    data_free: bool
    Config: type
    provenance: dict[str, str]

    def quantize(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> nn.Module: ...


class QuantMethod:
    """Convenience base: holds a resolved config; subclasses implement ``quantize``."""

    name: ClassVar[str] = ""
    data_free: ClassVar[bool] = False
    Config: ClassVar[type]
    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {}
    provenance: ClassVar[dict[str, str]] = {}
    summary: ClassVar[str] = ""

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def profiles(cls) -> list[str]:
        return ["paper", *sorted(cls.PROFILES)]

    @classmethod
    def make_config(cls, profile: str = "paper", **overrides: Any) -> Any:
        """Config for a profile: dataclass defaults ("paper") plus the profile's overrides.

        A profile the method does not define falls back to ``paper`` (a method may have no
        cheaper setting); ``PROFILES`` keys must be known profile names.
        """
        unknown = set(cls.PROFILES) - set(KNOWN_PROFILES)
        if unknown:
            raise ValueError(f"method {cls.name!r}: unknown profiles {sorted(unknown)}; use {KNOWN_PROFILES}")
        values = dict(cls.PROFILES.get(profile, {}))
        values.update(overrides)
        return dataclasses.replace(cls.Config(), **values)

    def quantize(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> nn.Module:
        raise NotImplementedError


_METHODS: dict[str, type] = {}
_loaded = False


def register_method(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice ({_METHODS[name]} and {cls})")
        provenance = getattr(cls, "provenance", {})
        bad = {k: v for k, v in provenance.items() if v.split(":")[0] not in PROVENANCE_LEVELS}
        if bad:
            raise ValueError(f"method {name!r}: provenance levels must be one of {PROVENANCE_LEVELS}: {bad}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in BUILTIN_MODULES:
        import_module(mod)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()  # importing registers the method
    _loaded = True  # only once every import succeeded, so a failure is not hidden next time


def available_methods() -> list[str]:
    _load_all()
    return list(_METHODS)


def get_method(name: str) -> type:
    _load_all()
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; valid: {', '.join(_METHODS)}")
    return _METHODS[name]
