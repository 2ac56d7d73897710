"""Derive the golden file's tolerances from measured spread (``results/golden/mini.json``).

Inputs are result directories of ``python -m bench run`` (records under ``<dir>/runs``):

* ``--golden-run DIR``: seed 0 of the mini grid exactly as ``bench regress`` runs it (ci profile,
  2 threads, this machine's native kernels): the golden values;
* ``--seed-runs DIR [DIR ...]``: the same grid at several seeds (``--seeds 0,1,2,...``; a later dir may
  add seeds for part of the grid): the seed spread; a kernel run naming the first of these dirs is its
  seed-0 records;
* ``--kernel-runs LABEL=DIR ...``: seed 0 under other CPU kernel paths and thread counts, e.g.
  ``ATEN_CPU_CAPABILITY=avx2`` with one thread: what another machine's kernels do to the same job.

Each metric of each golden job gets ``tolerance = max(floor, seed_k x seed std, kernel_k x kernel
deviation)`` (:class:`bench.regress.ToleranceRule`; the inputs are stored beside it). A cell whose
tolerance is not smaller than the gap between the same method's w4a4 and w8a8 results cannot tell a
4-bit result from an 8-bit one: it is kept (it still catches crashes and NaNs) but marked
``useful: false`` and listed in the report. The report also checks the rule by leaving each kernel
path out: would the tolerance derived without it have accepted it?

    python scripts/derive_golden.py --golden-run runs/native-t2 --seed-runs runs/seeds-t1 \\
        --kernel-runs native-t1=runs/seeds-t1 avx2-t1=runs/avx2-t1 default-t1=runs/default-t1 \\
        --out results/golden/mini.json --report results/golden/spread.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.grid import FP_METHOD  # noqa: E402
from bench.regress import GOLDEN_SCHEMA, ToleranceRule, write_golden  # noqa: E402
from bench.store import ResultStore, atomic_write_text  # noqa: E402

Cell = tuple[str, str]  # (job id without the seed, metric)


def cell_id(job_id: str) -> str:
    """``task/model/method/bits`` of ``task/model/method/bits/seed``."""
    return job_id.rsplit("/", 1)[0]


def load_runs(path: str, dataset: str = "mini", profile: str = "ci") -> list[dict[str, Any]]:
    records = [r for r in ResultStore(path).records() if r.get("dataset") == dataset
               and r.get("profile") == profile and not r.get("method_args") and not r.get("options")]
    if not records:
        raise SystemExit(f"error: no {dataset}/{profile} records under {path}/runs")
    return records


def by_seed(records: list[dict[str, Any]]) -> dict[Cell, dict[int, float]]:
    out: dict[Cell, dict[int, float]] = defaultdict(dict)
    for r in records:
        for metric, v in r["metrics"].items():
            out[(cell_id(r["job_id"]), metric)][int(r["seed"])] = float(v)
    return out


def environment_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    env = records[0].get("environment", {})
    keys = ("git_commit", "torch", "timm", "platform", "device_name", "torch_threads", "cpu_capability",
            "aten_cpu_capability_env")
    return {k: env.get(k) for k in keys}


def eval_sizes(runs: list[list[dict[str, Any]]]) -> dict[str, int]:
    """job id (any seed) -> evaluation-set size, from whichever records carry the task's dataset_info."""
    sizes: dict[str, int] = {}
    for records in runs:
        for r in records:
            n = (r.get("data") or {}).get("eval_images")
            if n:
                sizes.setdefault(cell_id(r["job_id"]) + "/0", int(n))
    return sizes


def gaps(golden: Mapping[str, Mapping[str, float]]) -> dict[Cell, float | None]:
    """Per cell, |w8a8 - w4a4| of the same task/model/method/metric; for ``fp`` the distance from FP to
    the model's lowest w4a4 result (what a regression check must be able to tell apart)."""
    values = {(cell_id(j), m): v for j, ms in golden.items() for m, v in ms.items()}
    out: dict[Cell, float | None] = {}
    for (cid, metric), v in values.items():
        task, model, method, _bits = cid.split("/")
        if method == "fp":
            lows = [x for (c, m), x in values.items() if m == metric and c.startswith(f"{task}/{model}/")
                    and c.endswith("/w4a4")]
            out[(cid, metric)] = v - min(lows) if lows else None
            continue
        lo = values.get((f"{task}/{model}/{method}/w4a4", metric))
        hi = values.get((f"{task}/{model}/{method}/w8a8", metric))
        out[(cid, metric)] = abs(hi - lo) if lo is not None and hi is not None else None
    return out


def derive(
    golden_records: list[dict[str, Any]],
    seed_records: list[dict[str, Any]],
    kernel_records: Mapping[str, list[dict[str, Any]]],
    rule: ToleranceRule,
    leave_out: str | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """job id -> metric -> golden cell (the rule applied to the measured spread)."""
    seeds = by_seed(seed_records)
    kernels = {label: by_seed(recs) for label, recs in kernel_records.items() if label != leave_out}
    golden = {r["job_id"]: r["metrics"] for r in golden_records if r["seed"] == 0}
    sizes = eval_sizes([golden_records, seed_records, *kernel_records.values()])
    if leave_out is not None and kernel_records.get(leave_out) is seed_records:
        # the left-out path is also the seed runs' seed 0: drop that draw from the seed spread too
        seeds = {k: {s: v for s, v in d.items() if s != 0} for k, d in seeds.items()}
    gap = gaps(golden)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for job_id, metrics in sorted(golden.items()):
        cells = {}
        for metric, value in sorted(metrics.items()):
            key = (cell_id(job_id), metric)
            seed_values = [v for _, v in sorted(seeds.get(key, {}).items())]
            kernel_values = {label: k[key][0] for label, k in kernels.items() if 0 in k.get(key, {})}
            cell = rule.cell(float(value), sizes.get(job_id), seed_values, kernel_values)
            g = gap.get(key)
            cell["gap"] = None if g is None else round(g, 4)
            cell["useful"] = None if g is None else bool(cell["tolerance"] < g)
            cells[metric] = cell
        results[job_id] = cells
    return results


def binding_term(cell: Mapping[str, Any], rule: ToleranceRule) -> str:
    terms = {"floor": cell["floor"], "seed": rule.seed_k * (cell["seed_std"] or 0.0),
             "kernel": rule.kernel_k * (cell["kernel_dev"] or 0.0)}
    return max(terms, key=terms.__getitem__)


def rule_candidates(golden_records, seed_records, kernel_records,
                    candidates: list[ToleranceRule]) -> list[str]:
    """The leave-one-kernel-path-out check and the share of useful primary cells for other rules."""
    from tabulate import tabulate

    rows = []
    for rule in candidates:
        loo = leave_one_out(golden_records, seed_records, kernel_records, rule)
        res = derive(golden_records, seed_records, kernel_records, rule)
        prim = [(j, c) for j, ms in res.items() for m, c in ms.items() if m in PRIMARY]
        useful = {t: (sum(c["useful"] is True for j, c in prim if j.startswith(t + "/")),
                      sum(1 for j, _ in prim if j.startswith(t + "/"))) for t in ("cls", "det", "seg")}
        rejected = sum(n - ok for ok, n, _ in loo.values())
        total = sum(n for _, n, _ in loo.values())
        rows.append([f"{rule.seed_k:g}", f"{rule.kernel_k:g}", f"{rule.floor_se:g}", f"{rule.floor_images:g}",
                     f"{rejected}/{total}", *(f"{u}/{n}" for u, n in useful.values())])
    return [
        "## Rules tried",
        "",
        "The same check for other parameters of the rule (rejected = held-out kernel-path values outside "
        "the tolerance derived without that path; useful = primary-metric cells whose tolerance is below "
        "the w4a4-w8a8 gap). The committed rule is the narrowest tried with no rejection.",
        "",
        tabulate(rows, headers=["seed_k", "kernel_k", "floor_se", "floor_images", "LOO rejected",
                                "useful cls", "useful det", "useful seg"], tablefmt="github"),
        "",
    ]


def report(results: Mapping[str, Mapping[str, Mapping[str, Any]]], rule: ToleranceRule,
           loo: Mapping[str, tuple[int, int, list[str]]], sources: Mapping[str, Any],
           data_free: set[str], extra: list[str] = ()) -> str:
    from tabulate import tabulate

    cells = [(j, m, c) for j, ms in results.items() for m, c in ms.items()]
    useless = [(j, m, c) for j, m, c in cells if c["useful"] is False]
    binding: dict[str, int] = defaultdict(int)
    for _, _, c in cells:
        binding[binding_term(c, rule)] += 1
    lines = [
        "# Golden tolerances: measured spread of the mini grid",
        "",
        "Generated by `scripts/derive_golden.py`; the numbers below are computed from the records listed "
        "under Sources. Re-run the script after changing a method (see its docstring for the commands).",
        "",
        f"Rule: {rule.text()}.",
        "",
        f"{len(cells)} metric cells over {len(results)} jobs; the binding term is "
        + ", ".join(f"{k} for {v}" for k, v in sorted(binding.items())) + ".",
        "",
        "## Leave-one-kernel-path-out check",
        "",
        "Tolerances derived without one kernel path, applied to that path's seed-0 values (what a new "
        "machine does to the check):",
        "",
    ]
    rows = [[label, f"{ok}/{n}", ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else "")]
            for label, (ok, n, bad) in loo.items()]
    lines += [tabulate(rows, headers=["left out", "accepted", "rejected cells"], tablefmt="github"), ""]
    lines += list(extra)
    lines += [
        "## Cells useless as a regression check",
        "",
        f"{len(useless)} cells have a tolerance at least as wide as the gap between the same method's "
        "w4a4 and w8a8 results (for fp: FP minus the model's lowest w4a4), so they cannot tell a "
        "4-bit result from an 8-bit one. They stay in the golden file (a crash, NaN or gross break still "
        "fails) but are listed here rather than hidden.",
        "",
    ]
    rows = [[j, m, c["value"], c["tolerance"], c["gap"], c["seed_std"], c["kernel_dev"],
             binding_term(c, rule)] for j, m, c in useless]
    lines += [tabulate(rows, headers=["job", "metric", "golden", "tol", "gap", "seed std", "kernel dev",
                                      "binding"], tablefmt="github"), ""]
    lines += seed_budget(results, data_free)
    lines += ["## Every cell", ""]
    rows = []
    for j, m, c in cells:
        seeds = " / ".join(f"{v:.2f}" for v in c["seed_values"])
        kern = " / ".join(f"{k} {v:.2f}" for k, v in sorted(c["kernel_values"].items()))
        rows.append([j, m, c["value"], c["tolerance"], c["floor"], seeds, c["seed_std"], kern,
                     c["kernel_dev"], c["gap"], {True: "yes", False: "NO", None: ""}[c["useful"]]])
    lines += [tabulate(rows, headers=["job", "metric", "golden", "tol", "floor", "seeds", "seed std",
                                      "kernel paths (seed 0)", "kernel dev", "gap", "useful"],
                       tablefmt="github"), ""]
    lines += ["## Sources", "", "```", *(f"{k}: {v}" for k, v in sources.items()), "```", ""]
    return "\n".join(lines)


PRIMARY = ("top1", "bbox_mAP", "mIoU")


def data_free_methods(records: list[dict[str, Any]]) -> set[str]:
    """The quantization methods the records say are data-free (their ``method_info``; fp excluded)."""
    return {r["method"] for r in records
            if r["method"] != FP_METHOD and (r.get("method_info") or {}).get("data_free")}


def seed_budget(results: Mapping[str, Mapping[str, Mapping[str, Any]]], data_free: set[str]) -> list[str]:
    """How many seeds the tables need: the seed std of the data-free methods' 4-bit cells and the
    difference a two-sided Welch test (alpha 0.05, power 0.8) can resolve with n seeds per method,
    ``(z_0.975 + z_0.8) sqrt(2/n) sigma`` (normal approximation)."""
    from tabulate import tabulate

    stds = {}
    for job_id, metrics in results.items():
        _task, model, method, bits, _seed = job_id.split("/")
        if method in data_free and bits in ("w4a4", "w4a8"):
            for metric, c in metrics.items():
                if metric in PRIMARY and c["seed_std"] is not None:
                    stds[f"{model}/{method}/{bits}"] = c["seed_std"]
    if not stds:
        return []
    z = 1.959964 + 0.841621
    rows = []
    for bits in ("w4a4", "w4a8"):
        vals = sorted(v for k, v in stds.items() if k.endswith(bits))
        if not vals:
            continue
        med = statistics.median(vals)
        rows.append([bits, len(vals), f"{min(vals):.2f}", f"{med:.2f}", f"{max(vals):.2f}",
                     *(f"{z * (2 / n) ** 0.5 * med:.2f}" for n in (3, 5, 10))])
    return [
        "## Seeds the tables need",
        "",
        "Seed std (primary metric) of the data-free methods' 4-bit cells, and the difference between two "
        "methods that a Welch test over n seeds each resolves (alpha 0.05, power 0.8, at the median std):",
        "",
        tabulate(rows, headers=["bits", "cells", "min std", "median std", "max std", "n=3", "n=5", "n=10"],
                 tablefmt="github"),
        "",
    ]


def leave_one_out(
    golden_records, seed_records, kernel_records, rule
) -> dict[str, tuple[int, int, list[str]]]:
    out = {}
    for label, recs in kernel_records.items():
        cells = derive(golden_records, seed_records, kernel_records, rule, leave_out=label)
        ok, n, bad, seen = 0, 0, [], set()
        for r in recs:
            if r["seed"] != 0 or r["job_id"] not in cells or r["job_id"] in seen:
                continue
            seen.add(r["job_id"])
            for metric, v in r["metrics"].items():
                c = cells[r["job_id"]].get(metric)
                if c is None:
                    continue
                n += 1
                if abs(float(v) - c["value"]) <= c["tolerance"] + 1e-9:
                    ok += 1
                else:
                    bad.append(f"{r['job_id']}:{metric}")
        out[label] = (ok, n, sorted(bad))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--golden-run", required=True)
    p.add_argument("--seed-runs", required=True, nargs="+", metavar="DIR",
                   help="result dirs with the grid at several seeds (cells may have more seeds than others)")
    p.add_argument("--kernel-runs", nargs="*", default=[], metavar="LABEL=DIR")
    p.add_argument("--out", default=str(ROOT / "results" / "golden" / "mini.json"))
    p.add_argument("--report", default=str(ROOT / "results" / "golden" / "spread.md"))
    p.add_argument("--seed-k", type=float, default=ToleranceRule.seed_k)
    p.add_argument("--kernel-k", type=float, default=ToleranceRule.kernel_k)
    p.add_argument("--floor-se", type=float, default=ToleranceRule.floor_se)
    p.add_argument("--floor-images", type=float, default=ToleranceRule.floor_images)
    p.add_argument("--candidates", default="3,2,0.5,2;3,2,0.75,5;3,2,1,5;4,2,0.75,5;4,3,0.5,5;4,3,0.75,5;"
                   "5,3,0.75,5",
                   help="other rules to report, 'seed_k,kernel_k,floor_se,floor_images;...'")
    args = p.parse_args(argv)
    rule = ToleranceRule(args.seed_k, args.kernel_k, args.floor_se, args.floor_images)
    candidates = [ToleranceRule(*map(float, c.split(","))) for c in args.candidates.split(";") if c.strip()]
    golden_records = load_runs(args.golden_run)
    seed_dirs = [load_runs(d) for d in args.seed_runs]
    seed_records = [r for recs in seed_dirs for r in recs]
    kernel_records = {}
    for item in args.kernel_runs:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --kernel-runs takes LABEL=DIR, got {item!r}")
        same = Path(path).resolve() == Path(args.seed_runs[0]).resolve()
        kernel_records[label] = seed_records if same else load_runs(path)
    results = derive(golden_records, seed_records, kernel_records, rule)
    seeds = sorted({int(r["seed"]) for r in seed_records})
    sources = {
        "golden run": environment_of(golden_records),
        f"seed runs (seeds {','.join(map(str, seeds))})": environment_of(seed_records),
        **{f"kernel run {k}": environment_of(v) for k, v in kernel_records.items()},
    }
    golden = {
        "schema": GOLDEN_SCHEMA,
        "dataset": "mini",
        "profile": "ci",
        "rule": rule.to_dict(),
        "seeds_measured": seeds,
        "kernel_paths_measured": sorted(kernel_records),
        "results": results,
        "environment": environment_of(golden_records),
        "sources": {k: v for k, v in sources.items()},
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_golden(args.out, golden)
    loo = leave_one_out(golden_records, seed_records, kernel_records, rule)
    extra = rule_candidates(golden_records, seed_records, kernel_records, candidates) if candidates else []
    text = report(results, rule, loo, sources, data_free_methods(golden_records), extra)
    atomic_write_text(Path(args.report), text)
    n = sum(len(ms) for ms in results.values())
    useless = sum(c["useful"] is False for ms in results.values() for c in ms.values())
    print(f"wrote {args.out}: {len(results)} jobs, {n} metric cells, {useless} not useful as a check; "
          f"report {args.report}")
    for label, (ok, total, _) in loo.items():
        print(f"  leave out {label}: {ok}/{total} accepted by the tolerances derived without it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
