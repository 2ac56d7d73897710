"""The library API: build a :class:`Plan` from keyword arguments, ``run(plan)`` it.

The CLI, ``bench regress`` and tests all go through here; a scale-out executor receives the same
plain-data jobs (:meth:`Plan.jobs`).

    from bench import api
    plan = api.make_plan(methods=["minmax-ptq"], tasks=["cls"], models=["mini-vit"], bits=["w4a4"])
    summary = api.run(plan, results="results")

Every name is validated by :func:`make_plan` before anything runs; a bad one raises
:class:`UsageError` (one line, says the fix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.grid import FP_METHOD, Job, as_arg_sets, coerce_method_args, expand, parse_method_arg_sets
from bench.progress import Reporter
from bench.runner import RunSummary, run_jobs
from bench.store import ResultStore
from methods.base import METHODS
from methods.data import SOURCES
from methods.quant.bits import BitSpec, BitSpecError, parse_bits
from methods.quant.registry import unknown_name_message
from tasks.base import DATASETS, TASKS, Task, get_task, task_options

# The four uniform settings and one mixed-precision budget (average 5 bits for weights and for
# activations; per-layer bits from each method's allocator).
DEFAULT_BITS = ("w4a4", "w6a6", "w8a8", "w4a8", "mp5")
BASE_PROFILES = ("ci", "fast", "paper")
# Seeds when none are given. Mini: at 4 bits the data-free methods' seed std is a point or more
# (results/golden/spread.md), so one seed cannot rank them; three give the tables a mean ± std and a
# Welch test. Full runs cost GPU-hours per job: one seed unless asked.
DEFAULT_SEEDS = {"mini": (0, 1, 2), "full": (0,)}
# The grid the golden file covers (mini dataset, ci profile, seed 0): `bench regress` without selection.
REGRESS_GRID = {"methods": "all", "tasks": ("cls", "det", "seg"), "bits": DEFAULT_BITS, "seeds": (0,)}


class UsageError(Exception):
    """A bad request: printed by the CLI as one ``error:`` line, exit status 2."""


@dataclass
class Plan:
    """A validated grid: everything needed to expand and run it (plain data but the task objects)."""

    tasks: dict[str, Task]
    models_by_task: dict[str, list[str]]
    methods: list[str]
    bits: list[BitSpec]
    seeds: list[int]
    dataset: str
    profile: str
    device: torch.device
    weights: str | None = None
    options: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> non-default options
    # config fields for every quant method: one set, or several (a sweep: one table row per set)
    method_args: list[dict[str, Any]] = field(default_factory=lambda: [{}])

    def jobs(self) -> list[Job]:
        return expand(self.models_by_task, self.methods, self.bits, self.seeds, self.dataset, self.profile,
                      self.weights, tasks=self.tasks, options=self.options, method_args=self.method_args)


def split_names(value: str | Sequence[str] | None) -> list[str]:
    """``"a, b"`` or a sequence -> a list of stripped names (None -> [])."""
    if value is None:
        return []
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    return [str(v).strip() for v in value]


def check_names(kind: str, given: Sequence[str], valid: Sequence[str]) -> None:
    """UsageError (with a did-you-mean) for the first name not in ``valid``."""
    for name in given:
        if name not in valid:
            raise UsageError(unknown_name_message(kind, name, list(valid)))


def registry_names(kind: str, registry: Any) -> list[str]:
    try:
        registry.load_all()  # a broken built-in or plugin fails here, by name
    except ImportError as e:
        raise UsageError(f"cannot load the {kind}: {e}") from e
    return registry.names()


def device_from(name: str | torch.device) -> torch.device:
    """A torch device, checked: cpu, cuda or cuda:N that exists."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"unknown device {name!r}; valid: cpu, cuda, cuda:N") from e
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {name!r}; valid: cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available (torch {torch.__version__}); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def make_plan(
    *,
    methods: str | Sequence[str] = "all",
    tasks: str | Sequence[str] = ("cls",),
    models: str | Sequence[str] | None = None,
    bits: str | Sequence[str] = DEFAULT_BITS,
    seeds: str | Sequence[int] | None = None,
    dataset: str = "mini",
    profile: str = "ci",
    device: str | torch.device = "cpu",
    weights: str | None = None,
    data_root: str | Path | None = None,
    quant_scope: str | None = None,
    method_args: str | Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> Plan:
    """Validate every name and value; raises :class:`UsageError` before anything is written.

    ``methods="all"`` selects every registered method; ``seeds=None`` the dataset's default
    (``DEFAULT_SEEDS``); ``method_args`` is ``"k=v,...;k=v,..."`` (``;`` separates the sets of a sweep),
    a mapping of config fields, or a list of mappings.
    """
    all_methods = registry_names("methods", METHODS)
    method_names = split_names(methods)
    if method_names == ["all"]:
        method_names = all_methods
    check_names("method", method_names, all_methods)
    if FP_METHOD not in all_methods:
        raise UsageError(f"method {FP_METHOD!r} (the FP reference of every table) is not registered")
    task_names = split_names(tasks)
    check_names("task", task_names, registry_names("tasks", TASKS))
    check_names("dataset", [dataset], DATASETS)
    try:
        bit_specs = [parse_bits(b) for b in split_names(bits)]
    except BitSpecError as e:
        raise UsageError(str(e)) from e
    if not bit_specs:
        raise UsageError("--bits is empty")
    seed_list = _seeds(DEFAULT_SEEDS.get(dataset, (0,)) if seeds is None else seeds)
    profiles = sorted(set(BASE_PROFILES).union(*(METHODS.get(m).profiles() for m in method_names)))
    check_names("profile", [profile], profiles)
    dev = device_from(device)
    margs = _method_args(method_args, method_names)
    options = _task_options(task_names, quant_scope)
    task_objs = {t: get_task(t, data_root=data_root, **options.get(t, {})) for t in task_names}
    models_by_task = _models(task_objs, dataset, split_names(models))
    if weights is not None:
        if not Path(weights).is_file():
            raise UsageError(f"--weights {weights}: no such file")
        n_models = sum(len(ms) for ms in models_by_task.values())
        if n_models != 1:
            raise UsageError(f"--weights applies to one model; select exactly one with --models "
                             f"(got {n_models})")
    return Plan(task_objs, models_by_task, method_names, bit_specs, seed_list, dataset, profile, dev, weights,
                options, margs)


def _seeds(seeds: str | Sequence[int]) -> list[int]:
    text = seeds if isinstance(seeds, str) else ",".join(str(s) for s in seeds)
    try:
        out = [int(s) for s in split_names(text)]
    except ValueError as e:
        raise UsageError(f"invalid --seeds {text!r}; use comma-separated integers, e.g. 0,1,2") from e
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise UsageError(f"invalid --seeds {text!r}; use distinct non-negative integers, e.g. 0,1,2")
    return out


def _models(tasks: Mapping[str, Task], dataset: str, wanted: list[str]) -> dict[str, list[str]]:
    """Models per task: every default model, or the ``wanted`` ones (optional models only by name)."""
    if not wanted:
        by_task = {t: list(task.models(dataset)) for t, task in tasks.items()}
    else:
        named = {t: [*task.models(dataset), *task.optional_models(dataset)] for t, task in tasks.items()}
        check_names("model", wanted, sorted({m for ms in named.values() for m in ms}))
        by_task = {t: [m for m in wanted if m in ms] for t, ms in named.items()}
    return {t: ms for t, ms in by_task.items() if ms}


def _method_args(value: str | Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
                 methods: list[str]) -> list[dict[str, Any]]:
    """Parsed method-arg sets; every selected quantization method must have each field."""
    try:
        sets = parse_method_arg_sets(value) if value is None or isinstance(value, str) else as_arg_sets(value)
        for method in methods:
            if method != FP_METHOD:
                for margs in sets:
                    coerce_method_args(method, margs)
    except ValueError as e:
        raise UsageError(f"{e} (--method-args)") from e
    if any(sets) and methods == [FP_METHOD]:
        raise UsageError("--method-args sets quantization-method fields; select a method besides fp")
    for margs in sets:
        source = margs.get("data_source")
        if source is not None:
            check_names("data source", [str(source)], registry_names("data sources", SOURCES))
    return sets


def _task_options(task_names: list[str], quant_scope: str | None) -> dict[str, dict[str, str]]:
    """Non-default task options per task (``quant_scope`` applies to the tasks that accept it)."""
    if quant_scope is None:
        return {}
    scoped = {t: task_options(t)["quant_scope"] for t in task_names if "quant_scope" in task_options(t)}
    valid = next(iter(scoped.values()), ("backbone", "all"))
    if quant_scope not in valid:
        raise UsageError(f"unknown --quant-scope {quant_scope!r}; valid: {', '.join(valid)}")
    if not scoped:
        raise UsageError(f"--quant-scope applies to det and seg only (tasks: {', '.join(task_names)})")
    if quant_scope == valid[0]:
        return {}  # the default: not recorded, so keys match runs without the flag
    return {t: {"quant_scope": quant_scope} for t in scoped}


def regress_plan(**selection: Any) -> tuple[Plan, bool]:
    """The golden grid (mini, ci) restricted by ``selection`` (methods, tasks, models, bits, seeds,
    device); returns the plan and whether it is partial (only golden jobs inside it count)."""
    chosen = {k: v for k, v in selection.items() if v is not None}
    partial = any(k in chosen for k in (*REGRESS_GRID, "models"))
    grid = {**REGRESS_GRID, **chosen}
    return make_plan(dataset="mini", profile="ci", weights=None, **grid), partial


def run(plan: Plan, results: str | Path = "results", *, force: bool = False,
        reporter: Reporter | None = None) -> RunSummary:
    """Run (or resume) every job of ``plan``; one record per job under ``<results>/runs``."""
    store = ResultStore(results)
    return run_jobs(plan.jobs(), store, plan.tasks, plan.device, force=force, reporter=reporter)


__all__ = ["Plan", "UsageError", "make_plan", "regress_plan", "run", "RunSummary", "device_from"]
