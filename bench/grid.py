"""The job grid: (task, model, method, bits, seed) expanded from the command line.

Each (task, model, dataset) gets one FP job (method ``fp``, bits ``fp``, seed
``FP_SEED``) placed before the quantized jobs that need its metric; every other
method gets one job per bit spec and seed. Jobs carry the resolved method config
so the key (and hence resume) changes whenever the config does.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.store import job_key, jsonable, method_args_suffix
from methods.base import get_method
from methods.quant.bits import BitSpec
from tasks.base import Task, file_sha256

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
    # config fields set on the command line (--method-args); already inside ``config`` (hence the key),
    # kept apart so job ids and tables can tell the run from the profile's own setting
    method_args: dict[str, Any] = field(default_factory=dict)

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
        if self.method_args:  # recorded; the key already differs through ``config``
            parts["method_args"] = jsonable(dict(sorted(self.method_args.items())))
        return parts

    @functools.cached_property
    def key(self) -> str:
        return job_key(self.key_parts())

    @property
    def job_id(self) -> str:
        """Readable identity used by the golden file: task/model/method/bits/seed[?option=value]."""
        method = self.method + method_args_suffix(self.method_args)
        base = f"{self.task}/{self.model}/{method}/{self.bits}/{self.seed}"
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


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` where it is not inside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == sep and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def parse_value(text: str) -> Any:
    """A Python literal; a bracketed list of bare words is a tuple of strings; anything else a string."""
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if len(text) >= 2 and text[0] in "([" and text[-1] in ")]":
        inner = text[1:-1].strip()
        return tuple(parse_value(v) for v in split_top_level(inner) if v.strip()) if inner else ()
    return text


def as_arg_sets(method_args: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """One set (a mapping, or None for the profile's own) or a sequence of sets -> a list of sets."""
    if method_args is None or isinstance(method_args, Mapping):
        return [dict(method_args or {})]
    return [dict(a) for a in method_args] or [{}]


def parse_method_arg_sets(text: str | None) -> list[dict[str, Any]]:
    """``lr=1e-3;lr=1e-4,epochs=5;`` -> one dict per ``;``-separated set (a sweep: one table row per
    set; an empty set is the profile's own setting). Without ``;`` a single set."""
    if not text or not text.strip():
        return [{}]
    sets = [parse_method_args(part) for part in split_top_level(text, ";")]
    seen = [jsonable(s) for s in sets]
    for i, s in enumerate(seen):
        if s in seen[:i]:
            raise ValueError(f"--method-args: set {i + 1} repeats an earlier set ({text!r})")
    return sets


def parse_method_args(text: str | None) -> dict[str, Any]:
    """``rounds=24,adv_weight=10,lr_steps=(8,50)`` -> a dict of Python values (strings stay strings).

    Commas inside brackets belong to the value, so tuples can be given as ``(8,50)`` or ``(fc,head)``.
    """
    out: dict[str, Any] = {}
    if not text or not text.strip():
        return out
    for item in (it.strip() for it in split_top_level(text)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--method-args: {item!r} is not key=value (e.g. rounds=24,adv_weight=10)")
        out[key.strip()] = parse_value(value)
    return out


def coerce_method_args(method: str, method_args: Mapping[str, Any]) -> dict[str, Any]:
    """The args with each value converted to its config field's type; ValueError names the problem."""
    config = get_method(method).Config()
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out: dict[str, Any] = {}
    for key, value in method_args.items():
        if key not in fields:
            raise ValueError(f"method {method!r} has no config field {key!r}; fields: {', '.join(fields)}")
        default = fields[key]
        if default is None or value is None or type(value) is type(default):
            out[key] = value
        elif isinstance(default, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"  # flags as lm-eval and YAML users write them
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(default, tuple) and isinstance(value, (tuple, list)):
            out[key] = tuple(value)
        elif isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float) \
                and value.is_integer():
            out[key] = int(value)
        else:
            raise ValueError(f"method {method!r}: {key}={value!r} should be {type(default).__name__} "
                             f"like the default {default!r}")
    return out


def resolved_config(
    method: str, profile: str, method_args: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The method's config for a profile (plus ``method_args``) as plain data (JSON-safe)."""
    return jsonable(get_method(method).make_config(profile, **dict(method_args or {})))


def weights_tag(path: str | None) -> str:
    """Identify a weights file by name and content hash (a renamed copy keeps its results); the same
    tag as :meth:`tasks.base.Task.weights_tag`'s default, for grids expanded without task objects."""
    if path is None:
        return DEFAULT_WEIGHTS_TAG
    return f"{Path(path).name}@sha256:{file_sha256(path)}"


def _tag_for(task: Task | None, model: str, dataset: str, weights: str | None) -> str:
    """The task's tag (a task may hash its default checkpoint); ours when no task object is given."""
    return str(task.weights_tag(model, dataset, weights)) if task is not None else weights_tag(weights)


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
    method_args: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> list[Job]:
    """All jobs, FP first within each (task, model); the FP job is added even if ``fp`` was not asked for.

    ``tasks`` (name -> Task) is only consulted for an optional ``weights_tag(model, dataset, weights)``;
    ``options`` (task -> non-default task options) is recorded in each job of that task;
    ``method_args`` (config field -> value, or a list of such sets: one row per set, a sweep) applies
    to every quantization method (not ``fp``).
    """
    quant_methods = [m for m in methods if m != FP_METHOD]
    quant_bits = [b.name for b in bits if not b.is_fp]  # FP is the per-model reference column
    arg_sets = as_arg_sets(method_args)
    # (method, set) -> (coerced args, resolved config), in the order given
    variants = {(m, i): (margs := coerce_method_args(m, a), resolved_config(m, profile, margs))
                for m in quant_methods for i, a in enumerate(arg_sets)}
    fp_config = resolved_config(FP_METHOD, profile)
    jobs: list[Job] = []
    for task, models in models_by_task.items():
        for model in models:
            tag = _tag_for((tasks or {}).get(task), model, dataset, weights)
            common = dict(
                task=task, model=model, dataset=dataset, profile=profile, weights_tag=tag, weights=weights,
                options=dict((options or {}).get(task, {})),
            )
            jobs.append(Job(method=FP_METHOD, bits=FP_BITS, seed=FP_SEED, config=fp_config, **common))
            for method in quant_methods:
                for i in range(len(arg_sets)):
                    margs, config = variants[(method, i)]
                    for b in quant_bits:
                        for seed in seeds:
                            jobs.append(Job(method=method, bits=b, seed=seed, config=config,
                                            method_args=margs, **common))
    return jobs
