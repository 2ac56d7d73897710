"""Named data sources: where a method's calibration / fine-tuning images come from.

A source turns ``(target, n, config, ctx)`` into ``n`` normalised images ``(n, C, H, W)``. The real
calibration split and Gaussian noise are defined here; the generators of the data-free methods
(PSAQ-ViT's patch similarity, PSAQ-ViT V2's initial batch, MimiQ's inter-head similarity) are
registered beside their method, which owns their config fields. Every method names its own source
(``QuantMethod.data_source``) and takes another one through its ``data_source`` config field, so
"PSAQ-ViT images through MimiQ's fine-tuning" is ``--method-args data_source=psaq-vit``.

:func:`obtain` is the harness side: it caches generated images per (source, model, weights, config,
seed), times them, records their SHA-256 and writes their gallery. Sources never do any of that.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from methods.quant.registry import Registry
from methods.quant.target import QuantTarget
from methods.synth.artifacts import cache_key, cached_tensor

if TYPE_CHECKING:
    from methods.base import RunContext

GALLERY_IMAGES = 64  # images in a source's PNG gallery


class DataSource:
    """One way to obtain images. Subclasses set the class attributes and implement :meth:`make`."""

    name: ClassVar[str] = ""
    data_free: ClassVar[bool] = True  # False: the images come from the task's data
    cacheable: ClassVar[bool] = True  # generated images are worth caching (real / noise are cheap)
    # The method whose Config holds this source's settings (None: the source takes no config). When a
    # method swaps in another method's source, that owner's config at the job's profile is used.
    owner: ClassVar[str | None] = None
    # Config fields that shape the images: only these key the cache (None: every field but data_source).
    key_fields: ClassVar[tuple[str, ...] | None] = None
    summary: ClassVar[str] = ""

    def make(self, target: QuantTarget, n: int, config: Any, ctx: RunContext) -> Tensor:
        """``n`` normalised images for ``target`` (any device; the harness moves them to CPU)."""
        raise NotImplementedError

    def count(self, config: Any, target: QuantTarget) -> int:
        """How many images the source makes when the owner's config decides (``num_images``)."""
        return int(config.num_images)

    def key_config(self, config: Any) -> dict[str, Any]:
        if config is None:
            return {}
        # data_source picks the source; it never shapes the images a source makes
        fields = self.key_fields or tuple(
            f.name for f in dataclasses.fields(config) if f.name != "data_source")
        return {k: getattr(config, k) for k in fields}


SOURCES: Registry[type[DataSource]] = Registry(
    "data source",
    builtins={
        "real": "methods.data",
        "noise": "methods.data",
        "psaq-vit": "methods.baselines",
        "psaq-vit-v2": "methods.psaq_vit_v2",
        "mimiq": "methods.mimiq",
        "spdfq": "methods.spdfq",
    },
    entry_point_group="vitq_bench.data_sources",
    base=DataSource,
)
register_source = SOURCES.register


@register_source("real")
class RealImages(DataSource):
    """The task's calibration split (disjoint from evaluation), drawn by the job seed."""

    data_free = False
    cacheable = False
    summary = "real images from the task's calibration split"

    def make(self, target: QuantTarget, n: int, config: Any, ctx: RunContext) -> Tensor:
        if ctx.real_images is None:
            raise RuntimeError("the run context has no real calibration images (task gave none)")
        return ctx.real_images(n)


@register_source("noise")
class GaussianNoise(DataSource):
    """N(0, 1) in normalised space (PSAQ-ViT V1's noise calibration)."""

    cacheable = False
    summary = "N(0,1) noise in normalised space"

    def make(self, target: QuantTarget, n: int, config: Any, ctx: RunContext) -> Tensor:
        return torch.randn(target.input_spec.shape(n), generator=ctx.generator())


@dataclasses.dataclass(frozen=True)
class Images:
    """What :func:`obtain` hands a method: the batch and where it came from."""

    images: Tensor  # normalised, CPU
    source: str
    cached: bool = False


def obtain(source_name: str, target: QuantTarget, n: int, config: Any, ctx: RunContext,
           label: str = "calibration") -> Images:
    """The harness side of a data source: cache, time, hash and gallery around ``source.make``."""
    source = SOURCES.get(source_name)()
    phase = "generation" if source.data_free else "data"
    hit = False
    with ctx.timer(phase):
        if source.cacheable and ctx.use_cache:
            key = cache_key(source_name, target.model_name, source.key_config(config), ctx.seed,
                            n=n, weights=target.info.get("weights"), quant_path=target.quant_path)
            path = Path(ctx.cache_dir) / f"{source_name}-{target.model_name}-{key}.pt"
            images, hit = cached_tensor(path, lambda: source.make(target, n, config, ctx))
            if hit:
                ctx.note(f"{source_name}: images loaded from cache {path.name}")
        else:
            images = source.make(target, n, config, ctx).detach().cpu()
    ctx.record_images(label, images)
    ctx.data_sources[label] = {"source": source_name, "images": int(images.shape[0]),
                               "data_free": source.data_free, "cached": hit}
    if source.data_free:
        ctx.save_gallery(f"{source_name}_{label}", target, images)
    return Images(images, source_name, hit)


__all__ = ["DataSource", "SOURCES", "register_source", "obtain", "Images", "RealImages", "GaussianNoise"]
