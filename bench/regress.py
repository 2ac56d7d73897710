"""Golden-file regression: compare a fresh mini/ci grid with committed metrics.

Golden file (JSON)::

    {
      "schema": 1,
      "dataset": "mini", "profile": "ci",
      "tolerance": {"top1": 0.5, "top5": 0.5},      # absolute, per metric ("*" = default)
      "results": {"cls/mini-vit/psaq-vit/w4a4/0": {"top1": 71.3, "top5": 97.9}, ...},
      "environment": {...},                           # where the golden numbers were produced (info)
      "updated": "2025-01-01T00:00:00+00:00"
    }

Job ids are ``task/model/method/bits/seed``. A metric that moves by more than its
tolerance (either direction: a stale golden file hides the next real regression),
a golden job the run did not produce, or a produced job the golden file lacks,
is a failure.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from bench.store import atomic_write_json

GOLDEN_SCHEMA = 1
DEFAULT_TOLERANCE = 0.5  # percentage points, for metrics a new golden file has not seen before
EPS = 1e-9  # float noise never counts as movement


@dataclass
class Row:
    job_id: str
    metric: str
    golden: float | None
    observed: float | None
    tolerance: float | None
    status: (
        str  # ok | within | regressed | improved | missing-job | extra-job | missing-metric | extra-metric
    )

    @property
    def failed(self) -> bool:
        return self.status not in ("ok", "within")

    @property
    def delta(self) -> float | None:
        if self.golden is None or self.observed is None:
            return None
        return self.observed - self.golden


@dataclass
class Comparison:
    rows: list[Row]

    @property
    def failed(self) -> bool:
        return any(r.failed for r in self.rows)

    @property
    def moved(self) -> list[Row]:
        return [r for r in self.rows if r.status != "ok"]

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        parts = [f"{counts.pop('ok', 0)} ok"] + [f"{n} {s}" for s, n in sorted(counts.items())]
        verdict = "FAIL" if self.failed else "PASS"
        return f"{verdict}: {len(self.rows)} metric checks: " + ", ".join(parts)

    def table(self) -> str:
        rows = [
            [
                r.job_id,
                r.metric,
                _fmt(r.golden),
                _fmt(r.observed),
                "" if r.delta is None else f"{r.delta:+.4f}",
                _fmt(r.tolerance),
                r.status,
            ]
            for r in self.moved
        ]
        if not rows:
            return "no metric moved"
        return tabulate(
            rows,
            headers=["job", "metric", "golden", "observed", "Δ", "tol", "status"],
            tablefmt="github",
            disable_numparse=True,
        )


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def tolerance_for(tolerances: Mapping[str, float], metric: str) -> float:
    return float(tolerances.get(metric, tolerances.get("*", 0.0)))


def compare(
    golden: Mapping[str, Any], observed: Mapping[str, Mapping[str, float]], scope: Iterable[str] | None = None
) -> Comparison:
    """Check every golden metric against ``observed`` (job id -> metrics).

    ``scope`` (job ids) limits the check to part of the golden grid (a filtered run);
    ``None`` means the run was the full grid, so any golden job not observed is missing.
    """
    tol = golden.get("tolerance", {})
    expected: Mapping[str, Mapping[str, float]] = golden.get("results", {})
    if scope is not None:
        scope = set(scope)
        expected = {k: v for k, v in expected.items() if k in scope}
    rows: list[Row] = []
    for job_id in sorted(set(expected) | set(observed)):
        exp, obs = expected.get(job_id), observed.get(job_id)
        if obs is None:
            rows += [Row(job_id, m, v, None, tolerance_for(tol, m), "missing-job") for m, v in exp.items()]
            continue
        if exp is None:
            rows += [Row(job_id, m, None, v, None, "extra-job") for m, v in obs.items()]
            continue
        for metric in sorted(set(exp) | set(obs)):
            g, o = exp.get(metric), obs.get(metric)
            t = tolerance_for(tol, metric)
            if o is None:
                status = "missing-metric"
            elif g is None:
                status = "extra-metric"
            elif math.isnan(o) or abs(o - g) > t + EPS:
                status = "regressed" if math.isnan(o) or o < g else "improved"
            elif abs(o - g) > EPS:
                status = "within"
            else:
                status = "ok"
            rows.append(Row(job_id, metric, g, o, t, status))
    return Comparison(rows)


def load_golden(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "results" not in data:
        raise ValueError(f"{path}: not a golden file (no 'results')")
    if data.get("schema", GOLDEN_SCHEMA) != GOLDEN_SCHEMA:
        raise ValueError(f"{path}: golden schema {data.get('schema')} is not {GOLDEN_SCHEMA}")
    return data


def updated_golden(
    previous: Mapping[str, Any] | None,
    observed: Mapping[str, Mapping[str, float]],
    *,
    dataset: str,
    profile: str,
    environment: Mapping[str, Any],
    scope: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The golden file after ``--update``: a full run replaces every entry, a filtered one merges.

    Existing tolerances are kept; metrics never seen before get DEFAULT_TOLERANCE.
    """
    prev = previous or {}
    results = (
        {} if scope is None else {k: v for k, v in prev.get("results", {}).items() if k not in set(scope)}
    )
    results.update({k: dict(v) for k, v in observed.items()})
    tolerance = dict(prev.get("tolerance", {}))
    for metrics in results.values():
        for m in metrics:
            if m not in tolerance and "*" not in tolerance:
                tolerance[m] = DEFAULT_TOLERANCE
    return {
        "schema": GOLDEN_SCHEMA,
        "dataset": dataset,
        "profile": profile,
        "tolerance": dict(sorted(tolerance.items())),
        "results": dict(sorted(results.items())),
        "environment": dict(environment),
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_golden(path: str | Path, golden: Mapping[str, Any]) -> None:
    atomic_write_json(Path(path), golden)
