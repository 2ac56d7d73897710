"""The job grid: (task, model, method, bits, seed) expanded from the command line.

Each (task, model, dataset) gets one FP job (method ``fp``, bits ``fp``, seed
``FP_SEED``) placed before the quantized jobs that need its metric; every other
method gets one job per bit spec and seed. Jobs carry the resolved method config
so the key (and hence resume) changes whenever the config does.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.store import job_key, jsonable
from methods.base import get_method
from methods.quant.bits import BitSpec

FP_METHOD = "fp"
FP_BITS = "fp"
FP_SEED = 0  # the FP model is deterministic: one job whatever --seeds says
DEFAULT_WEIGHTS_TAG = "default"


@dataclass
class Job:
    task: str
    model: str
    dataset: str
    method: str
    bits: str
    seed: int
    profile: str
    config: dict[str, Any] = field(repr=False)
    weights_tag: str = DEFAULT_WEIGHTS_TAG
    weights: str | None = None  # file handed to task.load (not part of the key; its tag is)
    options: dict[str, Any] = field(default_factory=dict)  # task options, e.g. {"quant_scope": "all"}

    def key_parts(self) -> dict[str, Any]:
        parts = {
            "method": self.method,
            "config": self.config,
            "model": self.model,
            "weights": self.weights_tag,
            "task": self.task,
            "dataset": self.dataset,
            "bits": self.bits,
            "seed": self.seed,
            "profile": self.profile,
        }
        if self.options:  # only non-default task options enter the key: default keys stay stable
            parts["options"] = dict(sorted(self.options.items()))
        return parts

    @functools.cached_property
    def key(self) -> str:
        return job_key(self.key_parts())

    @property
    def job_id(self) -> str:
        """Readable identity used by the golden file: task/model/method/bits/seed[?option=value]."""
        base = f"{self.task}/{self.model}/{self.method}/{self.bits}/{self.seed}"
        return base + options_suffix(self.options)

    @property
    def is_fp(self) -> bool:
        return self.method == FP_METHOD

    @property
    def reference(self) -> tuple[str, str, str, str]:
        """The (task, model, weights, dataset) whose FP job this job compares with."""
        return (self.task, self.model, self.weights_tag, self.dataset)


def options_suffix(options: Mapping[str, Any] | None) -> str:
    """``?quant_scope=all`` for non-default task options, "" otherwise (job ids, table labels)."""
    if not options:
        return ""
    return "?" + "&".join(f"{k}={v}" for k, v in sorted(options.items()))


def resolved_config(method: str, profile: str) -> dict[str, Any]:
    """The method's config for a profile as plain data (dataclasses.asdict, JSON-safe)."""
    return jsonable(get_method(method).make_config(profile))


@functools.cache
def weights_tag(path: str | None) -> str:
    """Identify a weights file by name and content hash (a renamed copy keeps its results)."""
    if path is None:
        return DEFAULT_WEIGHTS_TAG
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{Path(path).name}@sha256:{h.hexdigest()[:12]}"


def _tag_for(task: Any, model: str, dataset: str, weights: str | None) -> str:
    """The task's own tag when it has one (it can hash its default checkpoint), else ours."""
    hook = getattr(task, "weights_tag", None)
    return str(hook(model, dataset, weights)) if callable(hook) else weights_tag(weights)


def expand(
    models_by_task: dict[str, Sequence[str]],
    methods: Sequence[str],
    bits: Sequence[BitSpec],
    seeds: Sequence[int],
    dataset: str,
    profile: str,
    weights: str | None = None,
    tasks: Mapping[str, Any] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Job]:
    """All jobs, FP first within each (task, model); the FP job is added even if ``fp`` was not asked for.

    ``tasks`` (name -> Task) is only consulted for an optional ``weights_tag(model, dataset, weights)``;
    ``options`` (task -> non-default task options) is recorded in each job of that task.
    """
    quant_methods = [m for m in methods if m != FP_METHOD]
    quant_bits = [b.name for b in bits if not b.is_fp]  # FP is the per-model reference column
    configs = {m: resolved_config(m, profile) for m in [FP_METHOD, *quant_methods]}
    jobs: list[Job] = []
    for task, models in models_by_task.items():
        for model in models:
            tag = _tag_for((tasks or {}).get(task), model, dataset, weights)
            common = dict(
                task=task, model=model, dataset=dataset, profile=profile, weights_tag=tag, weights=weights,
                options=dict((options or {}).get(task, {})),
            )
            jobs.append(
                Job(method=FP_METHOD, bits=FP_BITS, seed=FP_SEED, config=configs[FP_METHOD], **common)
            )
            for method in quant_methods:
                for b in quant_bits:
                    for seed in seeds:
                        jobs.append(Job(method=method, bits=b, seed=seed, config=configs[method], **common))
    return jobs
