"""Command line: ``python -m bench {run,list,tables,regress}`` (console script ``vitq-bench``).

Exit codes: 0 success; 1 a job failed, no records for tables, or a regression;
2 a usage error (unknown name, bad flag, missing data/weights, no CUDA) — checked
before any job runs, so a bad command writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from bench import regress as rg
from bench.env import environment
from bench.grid import FP_METHOD, Job, coerce_method_args, expand, parse_method_args
from bench.runner import RunSummary, run_jobs
from bench.store import ResultStore, jsonable
from bench.tables import FORMATS, write_tables
from methods.base import available_methods, get_method
from methods.quant.bits import BIT_CANDIDATES, NAMED_SPECS, BitSpec, BitSpecError, parse_bits
from tasks.base import DATASETS, Task, TaskError, available_tasks, get_task, task_options

DEFAULT_BITS = "w4a4,w6a6,w8a8,w4a8"
BASE_PROFILES = ("ci", "fast", "paper")
PLUGIN_ENV = "VITQ_BENCH_PLUGINS"
GOLDEN_DEFAULT = "results/golden/mini.json"
# The grid the golden file covers (mini dataset, ci profile): `bench regress` without selection flags.
REGRESS_GRID = {"methods": "all", "tasks": "cls,det,seg", "bits": DEFAULT_BITS, "seeds": "0"}
# Seeds when --seeds is not given. Mini: at 4 bits the data-free methods' seed std is a point or more
# (results/golden/spread.md), so one seed cannot rank them; three give the tables a mean ± std and a
# Welch test. Full runs cost GPU-hours per job: one seed unless asked.
DEFAULT_SEEDS = {"mini": "0,1,2", "full": "0"}


class UsageError(Exception):
    """A bad command line: printed as one ``error:`` line, exit status 2."""


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _check_names(kind: str, given: Sequence[str], valid: Sequence[str]) -> None:
    for name in given:
        if name not in valid:
            raise UsageError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")


def load_plugins(specs: Sequence[str]) -> None:
    """Import ``module[:function]`` or ``path/file.py[:function]`` (calling the function if given).

    Lets users register a method or task from one file without packaging an entry point.
    """
    for spec in specs:
        target, _, func = spec.partition(":")
        try:
            if target.endswith(".py"):
                path = Path(target).resolve()
                mod_spec = importlib.util.spec_from_file_location(path.stem, path)
                if mod_spec is None or mod_spec.loader is None or not path.is_file():
                    raise ImportError(f"no such file {target}")
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[path.stem] = module
                mod_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(target)
            if func:
                getattr(module, func)()
        except (ImportError, AttributeError) as e:
            raise UsageError(f"cannot load plugin {spec!r}: {e}") from e


def _registry(kind: str, lister) -> list[str]:
    try:
        return lister()
    except ImportError as e:  # a built-in module that is missing or broken: say which
        raise UsageError(f"cannot load the built-in {kind}: {e}") from e


@dataclass
class Plan:
    """A validated command line: everything needed to expand and run the grid."""

    tasks: dict[str, Task]
    models_by_task: dict[str, list[str]]
    methods: list[str]
    bits: list[BitSpec]
    seeds: list[int]
    dataset: str
    profile: str
    device: torch.device
    weights: str | None
    options: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> non-default options
    method_args: dict[str, Any] = field(default_factory=dict)  # --method-args (every quant method)

    def jobs(self) -> list[Job]:
        return expand(
            self.models_by_task,
            self.methods,
            self.bits,
            self.seeds,
            self.dataset,
            self.profile,
            self.weights,
            tasks=self.tasks,
            options=self.options,
            method_args=self.method_args,
        )


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"unknown device {name!r}; valid: cpu, cuda, cuda:N") from e
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {name!r}; valid: cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name}: CUDA is not available (torch {torch.__version__}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Validate every name on the command line; raises UsageError before anything is written."""
    all_methods = _registry("methods", available_methods)
    methods = all_methods if args.methods.strip() == "all" else _split(args.methods)
    _check_names("method", methods, all_methods)
    if FP_METHOD not in all_methods:
        raise UsageError(f"method {FP_METHOD!r} (the FP reference of every table) is not registered")
    all_tasks = _registry("tasks", available_tasks)
    task_names = _split(args.tasks)
    _check_names("task", task_names, all_tasks)
    _check_names("dataset", [args.dataset], DATASETS)
    try:
        bits = [parse_bits(b) for b in _split(args.bits)]
    except BitSpecError as e:
        raise UsageError(str(e)) from e
    if not bits:
        raise UsageError("--bits is empty")
    if args.seeds is None:
        args.seeds = DEFAULT_SEEDS.get(args.dataset, "0")
    try:
        seeds = [int(s) for s in _split(args.seeds)]
    except ValueError as e:
        raise UsageError(f"invalid --seeds {args.seeds!r}; use comma-separated integers, e.g. 0,1,2") from e
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UsageError(f"invalid --seeds {args.seeds!r}; use distinct non-negative integers, e.g. 0,1,2")
    profiles = sorted(set(BASE_PROFILES).union(*(get_method(m).profiles() for m in methods)))
    _check_names("profile", [args.profile], profiles)
    device = _device(args.device)
    method_args = _method_args(getattr(args, "method_args", None), methods)

    options = _task_options(task_names, getattr(args, "quant_scope", None))
    tasks = {t: get_task(t, data_root=args.data_root, **options.get(t, {})) for t in task_names}
    task_models = {t: list(task.models(args.dataset)) for t, task in tasks.items()}
    if args.models:
        wanted = _split(args.models)
        # optional models (e.g. mini-dinov2) run only when named
        named = {t: ms + _optional_models(task, args.dataset) for (t, ms), task in
                 zip(task_models.items(), tasks.values(), strict=True)}
        _check_names("model", wanted, sorted({m for ms in named.values() for m in ms}))
        models_by_task = {t: [m for m in wanted if m in ms] for t, ms in named.items()}
    else:
        models_by_task = task_models
    models_by_task = {t: ms for t, ms in models_by_task.items() if ms}
    weights = args.weights
    if weights is not None:
        if not Path(weights).is_file():
            raise UsageError(f"--weights {weights}: no such file")
        n_models = sum(len(ms) for ms in models_by_task.values())
        if n_models != 1:
            raise UsageError(
                f"--weights applies to one model; select exactly one with --models (got {n_models})"
            )
    return Plan(tasks, models_by_task, methods, bits, seeds, args.dataset, args.profile, device, weights,
                options, method_args)


def _method_args(text: str | None, methods: list[str]) -> dict[str, Any]:
    """Parsed ``--method-args``; every selected quantization method must have each field."""
    try:
        method_args = parse_method_args(text)
        for method in methods:
            if method != FP_METHOD:
                coerce_method_args(method, method_args)
    except ValueError as e:
        raise UsageError(f"{e} (--method-args)") from e
    if method_args and methods == [FP_METHOD]:
        raise UsageError("--method-args sets quantization-method fields; select a method besides fp")
    return method_args


def _optional_models(task: Task, dataset: str) -> list[str]:
    return list(task.optional_models(dataset))


def _task_options(task_names: list[str], quant_scope: str | None) -> dict[str, dict[str, str]]:
    """Non-default task options per task (``--quant-scope`` applies to the tasks that accept it)."""
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


def _print_summary(summary: RunSummary, records: str) -> None:
    print(
        f"{len(summary.results)} jobs: {summary.count('done')} run, {summary.count('cached')} cached, "
        f"{summary.count('failed')} failed; records {records}"
    )
    for r in summary.failed:
        print(f"  failed: {r.job.job_id}: {r.error}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    store = ResultStore(args.results)
    summary = run_jobs(plan.jobs(), store, plan.tasks, plan.device, force=args.force)
    for task in plan.models_by_task:
        for _, _, texts, paths in write_tables(store, task=task, dataset=plan.dataset):
            print()
            print(texts["md"])
            print(f"tables: {', '.join(str(p) for p in paths)}")
    _print_summary(summary, f"in {store.runs_dir}")
    return 1 if summary.failed else 0


def cmd_tables(args: argparse.Namespace) -> int:
    formats = _split(args.format)
    _check_names("format", formats, FORMATS)
    store = ResultStore(args.results)
    written = write_tables(store, task=args.task, dataset=args.dataset, formats=formats)
    if not written:
        print(
            f"error: no result records under {store.runs_dir} for task={args.task or 'any'} "
            f"dataset={args.dataset or 'any'}",
            file=sys.stderr,
        )
        return 1
    for task, dataset, texts, paths in written:
        print(texts.get("md", f"{task} / {dataset}"))
        print(f"tables: {', '.join(str(p) for p in paths)}\n")
    return 0


def cmd_regress(args: argparse.Namespace) -> int:
    args.dataset, args.profile, args.weights = "mini", "ci", None
    # Any selection flag makes this a partial check: only golden jobs inside the selection count.
    partial = any(getattr(args, f) is not None for f in (*REGRESS_GRID, "models"))
    for flag, default in REGRESS_GRID.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    plan = plan_from_args(args)
    golden_path = Path(args.golden)
    golden = None
    if golden_path.is_file():
        try:
            golden = rg.load_golden(golden_path)
        except ValueError as e:
            raise UsageError(str(e)) from e
        if (golden.get("dataset"), golden.get("profile")) not in ((plan.dataset, plan.profile), (None, None)):
            raise UsageError(
                f"{golden_path} holds {golden.get('dataset')}/{golden.get('profile')} results, "
                f"regress runs {plan.dataset}/{plan.profile}"
            )
    elif not args.update:
        raise UsageError(
            f"golden file {golden_path} not found; create it with `python -m bench regress --update`"
        )
    jobs = plan.jobs()
    scope = [j.job_id for j in jobs] if partial else None
    # Metrics are bit-identical only for one machine, kernel path and thread count: say which ran.
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    print(f"regress: CPU capability {torch.backends.cpu.get_cpu_capability()}"
          + (f" (ATEN_CPU_CAPABILITY={forced})" if forced else "")
          + f", {torch.get_num_threads()} torch threads, device {plan.device}")
    with contextlib.ExitStack() as stack:
        root = args.results or stack.enter_context(tempfile.TemporaryDirectory(prefix="vitq-regress-"))
        store = ResultStore(root)
        summary = run_jobs(jobs, store, plan.tasks, plan.device, force=args.force)
        done = [r for r in summary.results if r.record is not None]
        observed = {r.job.job_id: r.record["metrics"] for r in done}
        eval_sizes = {r.job.job_id: (r.record.get("data") or {}).get("eval_images") for r in done}
    _print_summary(summary, f"in {store.runs_dir}" if args.results else "in a temp dir (removed)")
    comparison = rg.compare(golden or {"results": {}}, observed, scope)
    if golden is not None:  # a first --update has nothing to compare with
        print(comparison.table())
    if args.update:
        if summary.failed:
            print("error: not updating the golden file: some jobs failed", file=sys.stderr)
            return 1
        env = environment(plan.device)
        info = {
            k: env.get(k)
            for k in ("git_commit", "git_dirty", "python", "torch", "timm", "platform", "device_name")
        }
        rg.write_golden(
            golden_path,
            rg.updated_golden(
                golden, observed, dataset=plan.dataset, profile=plan.profile, environment=info,
                eval_sizes=eval_sizes, scope=scope,
            ),
        )
        print(f"updated {golden_path} ({len(observed)} jobs); one run measures no spread, so the new cells' "
              "tolerances are the rule's floor: derive them with scripts/derive_golden.py")
        return 0
    print(comparison.summary())
    return 1 if comparison.failed else 0


def _method_config_table(name: str) -> str:
    """Every config field of one method with its value per profile (what --method-args can set)."""
    cls = get_method(name)
    profiles = cls.profiles()
    configs = [jsonable(cls.make_config(p)) for p in profiles]
    rows = [[field, *(c[field] for c in configs)] for field in configs[0]]
    return (f"{name}: config fields per profile (set any with --method-args K=V,...)\n"
            + tabulate(rows, headers=["field", *profiles], maxcolwidths=[None] + [40] * len(profiles)))


def cmd_list(args: argparse.Namespace) -> int:
    methods = _registry("methods", available_methods)
    if args.method:
        _check_names("method", [args.method], methods)
        print(_method_config_table(args.method))
        return 0
    rows, prov = [], []
    for name in methods:
        cls = get_method(name)
        rows.append([name, "yes" if cls.data_free else "no", ", ".join(cls.profiles()), cls.summary])
        prov += [[name, comp, level] for comp, level in cls.provenance.items()]
    print(
        "Methods\n"
        + tabulate(
            rows, headers=["method", "data-free", "profiles", "summary"], maxcolwidths=[None, None, None, 70]
        )
        + "\n"
    )
    if prov:
        print(
            "Provenance\n"
            + tabulate(prov, headers=["method", "component", "level: note"], maxcolwidths=[None, 24, 90])
            + "\n"
        )
    rows = []
    for name in _registry("tasks", available_tasks):
        task = get_task(name, data_root=args.data_root)
        for dataset in DATASETS:
            try:
                models = ", ".join(task.models(dataset))
                unavailable = task.unavailable_models(dataset)
                optional = [m + (f" (unavailable: {unavailable[m]})" if m in unavailable else "")
                            for m in _optional_models(task, dataset)]
                if optional:
                    models += "; optional, run when named: " + ", ".join(optional)
            except TaskError as e:
                models = f"(unavailable: {e})"
            rows.append([name, task.primary_metric, dataset, models])
    print(
        "Tasks\n"
        + tabulate(rows, headers=["task", "metric", "dataset", "models"], maxcolwidths=[None, None, None, 80])
        + "\n"
    )
    print(
        f"Bit specs: {', '.join(NAMED_SPECS)}, or wXaY with X, Y in {list(BIT_CANDIDATES)} "
        f"(method 'fp' always runs at fp; mixed precision mpN is not available yet)"
    )
    return 0


def _grid_args(p: argparse.ArgumentParser, regress: bool) -> None:

    def d(value: str) -> str | None:  # regress: None = "not selected", i.e. the full golden grid
        return None if regress else value

    p.add_argument(
        "--methods", default=d("all"), help="comma-separated method names, or 'all' (default: all)"
    )
    p.add_argument("--tasks", default=d("cls"), help="comma-separated tasks (default: cls)")
    p.add_argument("--models", default=None, help="comma-separated models (default: every model of the task)")
    p.add_argument(
        "--bits", default=d(DEFAULT_BITS), help=f"comma-separated bit specs (default: {DEFAULT_BITS})"
    )
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0 for regress; "
                   + ", ".join(f"{v} for --dataset {k}" for k, v in DEFAULT_SEEDS.items()) + " for run)")
    p.add_argument("--force", action="store_true", help="rerun jobs whose record exists (overwrites it)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--data-root", default=None, help="root of the full datasets (default: $VITQ_DATA)")
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads (default: torch's choice for run, 2 for regress)",
    )


REGRESS_THREADS = 2


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE[:FUNC]",
        help=f"import a module or .py file that registers methods/tasks (also ${PLUGIN_ENV})",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log method progress and notes")
    # --plugin/-v live on each subcommand only (a subparser default would overwrite a top-level value).
    parser = argparse.ArgumentParser(
        prog="vitq-bench", description="Low-bit ViT quantization benchmark harness."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,list,tables,regress}")

    p = sub.add_parser(
        "run", parents=[common], help="run the grid, skipping finished jobs; then render tables"
    )
    _grid_args(p, regress=False)
    p.add_argument("--dataset", default="mini", help="mini | full (default: mini)")
    p.add_argument(
        "--profile", default="ci", help="method hyper-parameter profile: ci | fast | paper (default: ci)"
    )
    p.add_argument("--results", default="results", help="results directory (default: results)")
    p.add_argument("--weights", default=None, help="local checkpoint for the (single) selected model")
    p.add_argument(
        "--quant-scope", default=None,
        help="det/seg: quantize the 'backbone' (default) or 'all' (backbone, neck and heads)",
    )
    p.add_argument(
        "--method-args", default=None, metavar="K=V,...",
        help="set config fields of the selected methods on top of the profile, e.g. "
        "'rounds=24,adv_weight=10' (recorded; the rows get their own table label)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("list", parents=[common], help="methods (with provenance), tasks, models, bit specs")
    p.add_argument("--data-root", default=None)
    p.add_argument("--method", default=None, help="show this method's config fields per profile instead")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("tables", parents=[common], help="render tables from the records")
    p.add_argument("--results", default="results")
    p.add_argument("--task", default=None, help="only this task (default: all)")
    p.add_argument("--dataset", default=None, help="only this dataset (default: all)")
    p.add_argument("--format", default=",".join(FORMATS), help="comma-separated: md, csv, tex (default: all)")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("regress", parents=[common], help="mini grid (ci profile) vs the golden file")
    _grid_args(p, regress=True)
    p.add_argument("--golden", default=GOLDEN_DEFAULT, help=f"golden file (default: {GOLDEN_DEFAULT})")
    p.add_argument("--update", action="store_true", help="write the golden file from this run")
    p.add_argument("--results", default=None, help="results directory to run in (default: a temp dir)")
    # CPU metrics are bit-reproducible for a fixed thread count; the golden file was made with 2.
    p.set_defaults(func=cmd_regress, threads=REGRESS_THREADS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        load_plugins([*_split(os.environ.get(PLUGIN_ENV)), *args.plugin])
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return args.func(args)
    except (UsageError, TaskError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (finished jobs are saved; rerun to resume)", file=sys.stderr)
        return 130
