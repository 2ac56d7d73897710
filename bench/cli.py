"""Command line: ``python -m bench {run,list,tables,leaderboard,regress}`` (console script ``vitq-bench``).

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
from pathlib import Path

import torch
from tabulate import tabulate

from bench import api
from bench import regress as rg
from bench.api import Plan, UsageError
from bench.env import environment
from bench.paper_tables import DEFAULT_PROFILE, RUN_HINT, write_paper_tables
from bench.papers import PaperSchemaError, load_paper
from bench.record import RecordSchemaError
from bench.runner import RunSummary
from bench.store import ResultStore, jsonable
from bench.tables import FORMATS, write_tables
from methods.base import METHODS, QuantMethod, get_method
from methods.data import SOURCES
from methods.quant.bits import BIT_CANDIDATES, NAMED_SPECS
from methods.quant.registry import UnknownName
from tasks.base import DATASETS, TASKS, TaskError, get_task

DEFAULT_BITS = ",".join(api.DEFAULT_BITS)
PLUGIN_ENV = "VITQ_BENCH_PLUGINS"
GOLDEN_DEFAULT = "results/golden/mini.json"
RESULTS_DEFAULT = "results"

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


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The command line's grid, validated (UsageError before anything is written)."""
    return api.make_plan(
        methods=args.methods, tasks=args.tasks, models=args.models, bits=args.bits, seeds=args.seeds,
        dataset=args.dataset, profile=args.profile, device=args.device, weights=args.weights,
        data_root=args.data_root, quant_scope=getattr(args, "quant_scope", None),
        method_args=getattr(args, "method_args", None),
    )


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
    summary = api.run(plan, store.root, force=args.force)
    for task in plan.models_by_task:
        for _, _, texts, paths in write_tables(store, task=task, dataset=plan.dataset):
            print()
            print(texts["md"])
            print(f"tables: {', '.join(str(p) for p in paths)}")
    _print_summary(summary, f"in {store.runs_dir}")
    return 1 if summary.failed else 0


def cmd_tables(args: argparse.Namespace) -> int:
    formats = api.split_names(args.format)
    api.check_names("format", formats, FORMATS)
    if args.paper:
        return cmd_paper_tables(args, formats)
    if args.commands or args.profile:
        raise UsageError("--commands and --profile apply to --paper tables only")
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


def cmd_paper_tables(args: argparse.Namespace, formats: list[str]) -> int:
    """``bench tables --paper NAME``: the paper's published tables beside the records."""
    dataset = args.dataset or "full"
    api.check_names("dataset", [dataset], list(DEFAULT_PROFILE))
    if args.task:
        raise UsageError("--task does not apply to --paper tables (each table names its task)")
    try:
        paper = load_paper(args.paper)
    except KeyError as e:
        raise UsageError(e.args[0]) from e
    store = ResultStore(args.results)
    results = None if args.results == RESULTS_DEFAULT else args.results
    texts, paths, commands = write_paper_tables(store, paper, dataset, args.profile, formats, results)
    print(texts.get("md", f"{paper.name} / {dataset}"))
    print(f"tables: {', '.join(str(p) for p in paths)}")
    if args.commands:
        print(f"\n# {len(commands)} run command(s) for the cells not run yet")
        if commands and dataset == "full":
            print(RUN_HINT)
        for line in commands:
            print(line)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    """``bench leaderboard``: the static HTML site of the records (bench/leaderboard.py)."""
    from bench.leaderboard import write_site  # local import: jinja2 and matplotlib only here

    if args.dataset is not None:
        api.check_names("dataset", [args.dataset], list(DATASETS))
    index = write_site(ResultStore(args.results), args.out, args.dataset)
    print(f"leaderboard: {index}")
    return 0


def cmd_regress(args: argparse.Namespace) -> int:
    # Any selection flag makes this a partial check: only golden jobs inside the selection count.
    plan, partial = api.regress_plan(methods=args.methods, tasks=args.tasks, models=args.models,
                                     bits=args.bits, seeds=args.seeds, device=args.device,
                                     data_root=args.data_root)
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
        summary = api.run(plan, root, force=args.force)
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
            + tabulate(rows, headers=["field", *profiles], maxcolwidths=[None] + [40] * len(profiles),
                       missingval="None"))


def cmd_list(args: argparse.Namespace) -> int:
    methods = api.registry_names("methods", METHODS)
    if args.method:
        api.check_names("method", [args.method], methods)
        print(_method_config_table(args.method))
        return 0
    rows, prov = [], []
    for name in methods:
        cls = get_method(name)
        rows.append([name, "yes" if cls.data_free else "no", cls.data_source if name != "fp" else "",
                     mp_allocator(cls), ", ".join(cls.profiles()), cls.summary])
        prov += [[name, comp, level] for comp, level in cls.provenance.items()]
    print(
        "Methods\n"
        + tabulate(
            rows, headers=["method", "data-free", "data source", "mp allocator", "profiles", "summary"],
            maxcolwidths=[None, None, None, None, None, 60],
        )
        + "\n"
    )
    sources = [[name, "yes" if src.data_free else "no", src.owner or "", src.summary]
               for name, src in SOURCES.load_all().items()]
    print("Data sources (--method-args data_source=NAME)\n"
          + tabulate(sources, headers=["source", "data-free", "settings from", "summary"]) + "\n")
    if prov:
        print(
            "Provenance\n"
            + tabulate(prov, headers=["method", "component", "level: note"], maxcolwidths=[None, 24, 90])
            + "\n"
        )
    rows = []
    for name in api.registry_names("tasks", TASKS):
        task = get_task(name, data_root=args.data_root)
        for dataset in DATASETS:
            try:
                models = ", ".join(task.models(dataset))
                unavailable = task.unavailable_models(dataset)
                optional = [m + (f" (unavailable: {unavailable[m]})" if m in unavailable else "")
                            for m in task.optional_models(dataset)]
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
        f"Bit specs: {', '.join(NAMED_SPECS)}, or wXaY with X, Y in {list(BIT_CANDIDATES)}; mixed "
        "precision mpN or mpwXaY (e.g. mp4, mp5, mpw4.9a6.2: parameter-weighted average weight bits <= X, "
        "element-weighted average activation bits <= Y; per-layer bits from the method's own allocator or "
        "the generic greedy one, candidates = the config's mp_candidates). Method 'fp' always runs at fp."
    )
    return 0


def mp_allocator(cls: type) -> str:
    """'own' when the method overrides the template's allocate hook, else 'generic' ('' for fp)."""
    if not cls.quantizes:
        return ""
    return "own" if cls.allocate is not QuantMethod.allocate else "generic"


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
    seed_defaults = ", ".join(
        f"{','.join(map(str, v))} for --dataset {k}" for k, v in api.DEFAULT_SEEDS.items())
    p.add_argument("--seeds", default=None,
                   help=f"comma-separated seeds (default: 0 for regress; {seed_defaults} for run)")
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
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{run,list,tables,leaderboard,regress}")

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
        "'rounds=24,adv_weight=10' (recorded; the rows get their own table label); ';' separates the "
        "sets of a sweep, one row each: 'lr=1e-3;lr=1e-4;' (an empty set is the profile's own row)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("list", parents=[common], help="methods (with provenance), tasks, models, bit specs")
    p.add_argument("--data-root", default=None)
    p.add_argument("--method", default=None, help="show this method's config fields per profile instead")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("tables", parents=[common], help="render tables from the records")
    p.add_argument("--results", default=RESULTS_DEFAULT)
    p.add_argument("--task", default=None, help="only this task (default: all)")
    p.add_argument("--dataset", default=None,
                   help="only this dataset (default: all; with --paper: full, or mini for the mini analogue)")
    p.add_argument("--format", default=",".join(FORMATS), help="comma-separated: md, csv, tex (default: all)")
    p.add_argument("--paper", default=None, metavar="NAME",
                   help="a paper's published tables (bench/papers/NAME.yaml) beside our records: "
                   "ours / published / Δ")
    p.add_argument("--commands", action="store_true",
                   help="with --paper: print the `bench run` line for each cell not run yet")
    p.add_argument("--profile", default=None,
                   help="with --paper: records of this profile (default: paper for full, ci for mini)")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("leaderboard", parents=[common],
                       help="write the static HTML leaderboard of the records (opens from file://)")
    p.add_argument("--results", default=RESULTS_DEFAULT)
    p.add_argument("--dataset", default=None, help="only this dataset: mini | full (default: all)")
    p.add_argument("--out", default=None, type=Path, help="site directory (default: <results>/leaderboard)")
    p.set_defaults(func=cmd_leaderboard)

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
        load_plugins([*api.split_names(os.environ.get(PLUGIN_ENV)), *args.plugin])
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return args.func(args)
    except (UsageError, TaskError, UnknownName, RecordSchemaError, PaperSchemaError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (finished jobs are saved; rerun to resume)", file=sys.stderr)
        return 130
