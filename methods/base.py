"""The method template, the method registry and the per-job RunContext.

A method is one class registered with ``@register_method("name")``. :meth:`QuantMethod.quantize` is
the one driver; a method file implements the hooks it needs, in the order they run:

1. ``target_config(target, ctx)``: the config for this target (e.g. det/seg settings; default: as is);
2. ``calibration_data(target, ctx)``: its images, from the data source named by the config's
   ``data_source`` field or else the method's ``data_source`` (real images for PTQ, the method's
   generator for data-free methods); the harness caches, times, hashes and galleries them;
   ``allocate(target, bits, images, ctx)`` (mixed-precision specs only): the per-layer bits, by the
   harness's generic greedy allocator on these same images unless the method has its own;
3. ``build(target, bits, ctx)``: the quantized copy (``policy(target)`` applied to the quant module);
4. ``calibrate(built, images, target, ctx)``: activation ranges (default: one pass, then freeze);
5. ``finetune(built, images, target, bits, ctx)``: training after calibration (default: none).

It returns a :class:`QuantResult`. ``bits=fp`` never reaches the hooks: the driver returns the FP
model. Config (a dataclass whose defaults are the paper's settings), ``PROFILES`` (overrides per
profile) and ``provenance`` (component -> "code-verified" | "paper" | "reconstructed" | "choice",
with a note) sit as data at the end of each method file.

Third-party methods register through the ``vitq_bench.methods`` entry-point group (the entry
point's name is the method name; its value the class, or a module whose import registers it).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from methods.data import GALLERY_IMAGES, SOURCES, obtain
from methods.quant.bits import BIT_CANDIDATES, BitSpec
from methods.quant.mixed import (
    DownstreamForward,
    SiteBits,
    Unit,
    block_index,
    greedy_allocate,
    kl_loss,
    relative_mse_loss,
    site_costs,
)
from methods.quant.policy import Policy, apply_policy, calibrate, freeze, site_kind
from methods.quant.reconstruct import block_units
from methods.quant.registry import Registry
from methods.quant.target import QuantTarget
from methods.synth.artifacts import save_image_grid, tensor_sha256

KNOWN_PROFILES = ("paper", "fast", "ci")
PROVENANCE_LEVELS = ("code-verified", "paper", "reconstructed", "choice")


@dataclass
class RunContext:
    """Everything a method may use from the harness for one job."""

    device: torch.device
    seed: int
    profile: str
    cache_dir: Path
    artifacts_dir: Path
    # n -> real calibration images (N,C,H,W); only the "real" data source calls it
    real_images: Callable[[int], Tensor] | None = None
    use_cache: bool = True  # cache generated images under cache_dir
    galleries: bool = True  # write PNG galleries of generated images under artifacts_dir
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("vitq"))
    progress: Callable[[str], None] = lambda msg: None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific record fields
    # label -> SHA-256 of each image batch the method used: same machine and threads, same hashes;
    # a changed hash with equal metrics still says the images moved
    image_hashes: dict[str, str] = field(default_factory=dict)
    data_sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> source, count
    galleries_written: dict[str, str] = field(default_factory=dict)  # label -> PNG path

    def record_images(self, label: str, images: Tensor) -> None:
        """Record the SHA-256 of an image batch under ``label`` for the result record."""
        self.image_hashes[label] = tensor_sha256(images)

    def save_gallery(self, label: str, target: QuantTarget, images: Tensor) -> None:
        """A PNG grid of (at most GALLERY_IMAGES of) ``images`` under the job's artifacts dir."""
        if not self.galleries:
            return
        path = Path(self.artifacts_dir) / f"{label}.png"
        grid = save_image_grid(target.input_spec.denormalize(images[:GALLERY_IMAGES]), path)
        self.galleries_written[label] = str(grid)

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


@dataclass
class MethodConfig:
    """Fields every quantizing method's Config has (its dataclass inherits this)."""

    # mixed precision (mpN specs): the bit-widths the allocator may give a layer's weights / activations
    mp_candidates: tuple[int, ...] = BIT_CANDIDATES
    # the allocator measures sensitivity on at most this many of the calibration images (the papers'
    # 32); targets without logits (det/seg: large inputs, a backbone forward per trial) on fewer
    mp_images: int = 32
    mp_images_dense: int = 8


@dataclass
class QuantResult:
    """What a method returns: the model to evaluate and what was applied to it."""

    model: nn.Module
    resolved_bits: BitSpec  # per-layer bits as applied (the record's layer_bits and model size)
    policy: dict[str, Any] | None = None  # the placement policy as data
    notes: list[str] = field(default_factory=list)


@dataclass
class Built:
    """The quantized copy the hooks work on."""

    model: nn.Module  # the whole (deep-copied) model
    qmodule: nn.Module  # its part that carries quantizers (``target.quant_path``)
    resolved_bits: BitSpec
    policy: dict[str, Any] | None = None


def quant_module(model: nn.Module, target: QuantTarget) -> nn.Module:
    return model.get_submodule(target.quant_path) if target.quant_path else model


class QuantMethod:
    """The template: subclasses set the class attributes and override the hooks they need."""

    name: ClassVar[str] = ""
    data_free: ClassVar[bool] = False
    data_source: ClassVar[str] = "real"  # the source calibration_data uses unless the config names one
    quantizes: ClassVar[bool] = True  # False: the FP reference (every bit spec returns the FP model)
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

    # -- the driver ----------------------------------------------------------------------------

    def quantize(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> QuantResult:
        """Run the hooks in order; the FP reference (``bits=fp``) returns the task's model unchanged."""
        if bits.is_fp or not self.quantizes:
            fp = bits if bits.is_fp else BitSpec("fp", None, None)
            return QuantResult(target.model, fp, None, ["the task's FP model, unchanged"])
        method = type(self)(self.target_config(target, ctx))
        images = method.calibration_data(target, ctx)
        if not bits.is_allocated:
            with ctx.timer("allocation"):
                bits = method.allocate(target, bits, images, ctx)
        built = method.build(target, bits, ctx)
        with ctx.timer("calibration"):
            method.calibrate(built, images, target, ctx)
        method.finetune(built, images, target, bits, ctx)
        return QuantResult(built.model.eval(), built.resolved_bits, built.policy)

    # -- hooks, in the order they run ------------------------------------------------------------

    def target_config(self, target: QuantTarget, ctx: RunContext) -> Any:
        """The config for this target (e.g. the det/seg settings); never modifies ``self.config``."""
        return self.config

    def source_name(self) -> str:
        return getattr(self.config, "data_source", None) or self.data_source

    def calibration_data(self, target: QuantTarget, ctx: RunContext) -> Tensor:
        """The images calibration (and fine-tuning) use, from the configured data source."""
        name = self.source_name()
        source = SOURCES.get(name)
        if source.owner in (None, self.name):  # no settings, or this method's own: it says how many
            config = self.config if source.owner else None
            n = self.num_images(target)
        else:  # another method's generator: that method's settings (and count) at this profile and target
            owner = get_method(source.owner)
            config = owner(owner.make_config(ctx.profile)).target_config(target, ctx)
            n = source().count(config, target)
            ctx.note(f"{self.name}: images from data source {name!r} ({owner.name}'s {ctx.profile} settings)")
        if self.data_free and not source.data_free:
            ctx.note(f"{self.name}: data_source={name!r} uses real images: this run is not data-free")
        return obtain(name, target, n, config, ctx).images

    def mp_candidates(self) -> tuple[int, ...]:
        """The bit-widths a mixed-precision allocation may choose from (config field ``mp_candidates``)."""
        return tuple(sorted(int(b) for b in getattr(self.config, "mp_candidates", BIT_CANDIDATES)))

    def allocate(self, target: QuantTarget, bits: BitSpec, images: Tensor, ctx: RunContext) -> BitSpec:
        """Per-layer bits for a mixed spec: the harness's generic greedy allocator. Sensitivity is
        measured on a probe copy built by this method at the largest candidate and calibrated (one
        pass, quantized weights) on ``images``: the method's own calibration data, so a data-free
        method's allocation never sees real images. Then the method runs as usual with the map."""
        start = max(self.mp_candidates())
        probe = self.build(target, BitSpec(f"w{start}a{start}", start, start), ctx)
        x = images.to(next(probe.model.parameters()).device)
        calibrate(probe.qmodule, [x], forward=lambda _m, b: probe.model(b), weights_quantized=True)
        return allocate_bits(self, probe, target, bits, x, SiteBits(probe.qmodule), ctx, mode="lazy",
                             allocator="generic")

    def num_images(self, target: QuantTarget) -> int:
        """How many calibration images the method asks its source for."""
        return int(self.config.num_images)

    def policy(self, target: QuantTarget) -> Policy:
        """Where the quantizers go and which kind (data: see methods.quant.policy)."""
        raise NotImplementedError(f"{type(self).__name__} must define policy() or override build()")

    def build(self, target: QuantTarget, bits: BitSpec, ctx: RunContext) -> Built:
        """A deep copy of the FP model with ``policy(target)`` applied to its quant module."""
        model = copy.deepcopy(target.model).eval()
        qmod = quant_module(model, target)
        policy = self.policy(target)
        resolved = apply_policy(qmod, policy, bits)
        return Built(model, qmod, resolved, policy.to_dict())

    def calibrate(self, built: Built, images: Tensor, target: QuantTarget, ctx: RunContext) -> None:
        """One forward of the whole copied model on ``images`` (the quant module may be a backbone
        inside it), then freeze: activation ranges fixed, fake-quantized weights cached."""
        device = next(built.model.parameters()).device
        model = built.model
        calibrate(built.qmodule, [images.to(device)], forward=lambda _m, x: model(x))
        freeze(built.qmodule)

    def finetune(self, built: Built, images: Tensor, target: QuantTarget, bits: BitSpec,
                 ctx: RunContext) -> None:
        """Training after calibration, in place on ``built`` (default: none)."""


# ---------------------------------------------------------------------------------------------
# Mixed precision: the greedy allocation on a calibrated probe (shared by the generic allocator and
# methods with their own, which pass their own way of setting a unit's bits)


def fixed_sites(built: Built) -> dict[str, tuple[bool, bool]]:
    """Sites whose weight / activation bits a policy rule fixes (``*_bits_override``): path ->
    (weights fixed, activations fixed)."""
    if built.policy is None:
        return {}
    policy = Policy.from_dict(built.policy)
    out = {}
    for path in built.resolved_bits.layers:
        m = built.qmodule.get_submodule(path)
        rule = policy.rule_for(site_kind(m), path, getattr(m, "role", None))
        if rule is not None and (rule.w_bits_override is not None or rule.a_bits_override is not None):
            out[path] = (rule.w_bits_override is not None, rule.a_bits_override is not None)
    return out


def allocate_bits(method: QuantMethod, probe: Built, target: QuantTarget, bits: BitSpec, images: Tensor,
                  set_bits: Callable[[Unit, int], None], ctx: RunContext, mode: str = "lazy",
                  allocator: str = "generic",
                  on_commit: Callable[[Unit, int], None] | None = None) -> BitSpec:
    """Greedy-allocate ``bits``' budget over the sites of a calibrated ``probe`` (every unit at the
    largest candidate); returns ``bits`` with the per-layer map and records the allocation in
    ``ctx.extra["mixed_precision"]``. The loss is measured on the first ``mp_images`` images
    (``mp_images_dense`` without logits)."""
    cands = method.mp_candidates()
    cfg = method.config
    limit = (getattr(cfg, "mp_images", MethodConfig.mp_images) if target.logits is not None
             else getattr(cfg, "mp_images_dense", MethodConfig.mp_images_dense))
    images = images[:limit]
    start = max(cands)
    layers = dict(probe.resolved_bits.layers)
    qmod, model = probe.qmodule, probe.model
    if target.logits is not None:
        logits = target.logits
        with torch.no_grad():
            loss_fn = kl_loss(logits(target.model, images))
        out, loss_name = (lambda: logits(model, images)), "KL(FP || quantized) of the logits"
    else:
        with torch.no_grad():
            loss_fn = relative_mse_loss(target.quant_module(images))
        out, loss_name = (lambda: qmod(images)), "relative MSE of the quant module's output (no logits)"
    costs = site_costs(qmod, out, images.shape[0])
    blocks = block_units(qmod)
    runner = DownstreamForward(qmod, blocks, out)
    fixed_flags = fixed_sites(probe)
    units, fixed, not_run = [], {"w": [0.0, 0.0], "a": [0.0, 0.0]}, []
    for path, (w, a) in layers.items():
        c = costs[path]
        fw, fa = fixed_flags.get(path, (False, False))
        run = c.macs > 0 or c.act_elements > 0
        if not run:
            not_run.append(path)
        for kind, b, count, is_fixed in (("w", w, c.weights, fw), ("a", a, c.act_elements, fa)):
            if b is None or not count:
                continue
            if is_fixed or not run or b != start:
                fixed[kind][0] += count * b
                fixed[kind][1] += count
            else:
                units.append(Unit(path, kind, count, block_index(path, blocks)))

    def loss(unit: Unit | None) -> float:
        return loss_fn(runner.refresh() if unit is None else runner.run(unit.block))

    result = greedy_allocate(units, bits.mixed, cands, set_bits, loss,
                             fixed={k: (v[0], v[1]) for k, v in fixed.items()}, mode=mode,
                             progress=ctx.progress, on_commit=on_commit,
                             commit_loss=lambda u: loss_fn(runner.refresh(u.block)))
    for u, b in result.bits.items():
        w, a = layers[u.path]
        layers[u.path] = (b, a) if u.kind == "w" else (w, b)
    ctx.extra["mixed_precision"] = {
        "allocator": allocator, "greedy": mode, "candidates": list(cands), "start_bits": start,
        "budget": list(bits.mixed), "averages": list(result.averages), "loss": loss_name,
        "loss_start": result.loss_start, "loss_end": result.loss_end, "steps": len(result.steps),
        "trials": result.trials, "forward_equivalents": round(runner.forwards, 2),
        "sensitivity_data": dict(ctx.data_sources.get("calibration", {})), "images": int(images.shape[0]),
        "fixed_sites": sorted(fixed_flags), "not_run_sites": sorted(not_run), "units": len(units),
        "history": result.steps,
    }
    ctx.note(f"{method.name}: {allocator} mixed-precision allocation ({mode} greedy over {len(units)} "
             f"units, candidates {list(cands)}) on its own calibration images")
    return bits.with_layers(layers)


# ---------------------------------------------------------------------------------------------
# Registry


def _check_provenance(name: str, cls: type[QuantMethod]) -> None:
    bad = {k: v for k, v in cls.provenance.items() if v.split(":")[0] not in PROVENANCE_LEVELS}
    if bad:
        raise ValueError(f"method {name!r}: provenance levels must be one of {PROVENANCE_LEVELS}: {bad}")


METHODS: Registry[type[QuantMethod]] = Registry(
    "method",
    builtins={
        "fp": "methods.baselines",
        "minmax-ptq": "methods.baselines",
        "noise-ptq": "methods.baselines",
        "psaq-vit": "methods.baselines",
        "psaq-vit-v2": "methods.psaq_vit_v2",
        "mimiq": "methods.mimiq",
        "spdfq": "methods.spdfq",
        "mptq-vit": "methods.mptq_vit",
    },
    entry_point_group="vitq_bench.methods",
    base=QuantMethod,
    validate=_check_provenance,
)


def register_method(
    name: str,
    *,
    config: type | None = None,
    profiles: dict[str, dict[str, Any]] | None = None,
    provenance: dict[str, str] | None = None,
) -> Callable[[type[QuantMethod]], type[QuantMethod]]:
    """Register a method class; ``config`` / ``profiles`` / ``provenance`` (when given) become its
    ``Config`` / ``PROFILES`` / ``provenance``, so a method file can keep them as data at its end."""

    def deco(cls: type[QuantMethod]) -> type[QuantMethod]:
        if config is not None:
            cls.Config = config
        if profiles is not None:
            cls.PROFILES = profiles
        if provenance is not None:
            cls.provenance = provenance
        METHODS.add(name, cls)
        return cls

    return deco


def get_method(name: str) -> type[QuantMethod]:
    return METHODS.get(name)
