"""Golden-file regression: compare a fresh mini/ci grid with committed metrics.

Golden file (JSON, schema 2)::

    {
      "schema": 2, "dataset": "mini", "profile": "ci",
      "rule": {"seed_k": 4.0, "kernel_k": 2.0, "floor_se": 0.75, "floor_images": 5.0, "text": "..."},
      "results": {"cls/mini-vit/psaq-vit/w4a4/0": {"top1": {"value": 74.3, "tolerance": 6.1,
                   "floor": 0.36, "seed_values": [...], "seed_std": 1.2, "kernel_values": {...},
                   "kernel_dev": 2.9, "eval_n": 2000, "gap": 13.1, "useful": true}, ...}, ...},
      "environment": {...}, "updated": "..."
    }

Each metric of each golden job carries its own tolerance and the inputs it was derived from
(:class:`ToleranceRule`; ``scripts/derive_golden.py`` measures the spread and writes the file). A
metric that moves by more than its tolerance (either direction: a stale golden file hides the next real
regression), a golden job the run did not produce, or a produced job the golden file lacks, is a
failure. Job ids are ``task/model/method/bits/seed``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from bench.store import atomic_write_json

GOLDEN_SCHEMA = 2
EPS = 1e-9  # float noise never counts as movement


@dataclass(frozen=True)
class ToleranceRule:
    """``tolerance = max(floor, seed_k · seed std, kernel_k · kernel deviation)``.

    * floor: ``floor_se`` binomial standard errors of the metric on the evaluation set,
      ``100·sqrt(p(1-p)/n)`` with ``p`` = the golden value / 100 and ``n`` = evaluation images (a move
      smaller than that says nothing about which images happened to be in the set), and at least
      ``floor_images`` images' worth, ``100·floor_images/n`` (the standard error vanishes near 0 or 100 %);
    * seed std: sample std (n-1) of the cell over the measured seeds at the ci profile;
    * kernel deviation: the largest |value - golden| of seed 0 over the other CPU kernel paths and
      thread counts measured (``ATEN_CPU_CAPABILITY=default|avx2|native``), i.e. what another machine's
      kernels did to this very job.
    """

    # chosen by scripts/derive_golden.py's leave-one-kernel-path-out check: the narrowest of the rules
    # tried that accepted every held-out kernel path (results/golden/spread.md, "Rules tried")
    seed_k: float = 4.0
    kernel_k: float = 2.0
    floor_se: float = 0.75
    floor_images: float = 5.0

    def text(self) -> str:
        return (f"tolerance = max(floor, {self.seed_k:g} x seed std, {self.kernel_k:g} x kernel deviation); "
                f"floor = max({self.floor_se:g} x 100 sqrt(p(1-p)/n), {self.floor_images:g} x 100/n) "
                "(p = golden value / 100, n = eval images: the binomial standard error, and at least "
                f"{self.floor_images:g} images' worth near 0 or 100 %); seed std over the measured seeds; "
                "kernel deviation = max |seed-0 value under another ATEN_CPU_CAPABILITY / thread count - "
                "golden|")

    def floor(self, value: float, eval_n: int | None) -> float:
        if not eval_n:
            return 0.0
        p = min(max(value / 100.0, 0.0), 1.0)
        se = 100.0 * math.sqrt(p * (1.0 - p) / eval_n)
        return max(self.floor_se * se, self.floor_images * 100.0 / eval_n)

    def cell(
        self,
        value: float,
        eval_n: int | None,
        seed_values: Sequence[float] = (),
        kernel_values: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """A golden cell: the value, its tolerance, and every input of the rule."""
        floor = self.floor(value, eval_n)
        seed_std = statistics.stdev(seed_values) if len(seed_values) > 1 else None
        kernel_values = dict(kernel_values or {})
        kernel_dev = max((abs(v - value) for v in kernel_values.values()), default=None)
        tol = max(floor, self.seed_k * (seed_std or 0.0), self.kernel_k * (kernel_dev or 0.0))
        return {
            "value": value,
            "tolerance": round(tol, 4),
            "floor": round(floor, 4),
            "eval_n": eval_n,
            "seed_values": list(seed_values),
            "seed_std": None if seed_std is None else round(seed_std, 4),
            "kernel_values": kernel_values,
            "kernel_dev": None if kernel_dev is None else round(kernel_dev, 4),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"seed_k": self.seed_k, "kernel_k": self.kernel_k, "floor_se": self.floor_se,
                "floor_images": self.floor_images, "text": self.text()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ToleranceRule:
        d = d or {}
        return cls(**{k: float(d[k]) for k in ("seed_k", "kernel_k", "floor_se", "floor_images") if k in d})


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


def compare(
    golden: Mapping[str, Any], observed: Mapping[str, Mapping[str, float]], scope: Iterable[str] | None = None
) -> Comparison:
    """Check every golden metric against ``observed`` (job id -> metrics).

    ``scope`` (job ids) limits the check to part of the golden grid (a filtered run);
    ``None`` means the run was the full grid, so any golden job not observed is missing.
    """
    expected: Mapping[str, Mapping[str, Mapping[str, Any]]] = golden.get("results", {})
    if scope is not None:
        scope = set(scope)
        expected = {k: v for k, v in expected.items() if k in scope}
    rows: list[Row] = []
    for job_id in sorted(set(expected) | set(observed)):
        exp, obs = expected.get(job_id), observed.get(job_id)
        if obs is None:
            rows += [Row(job_id, m, c["value"], None, c["tolerance"], "missing-job") for m, c in exp.items()]
            continue
        if exp is None:
            rows += [Row(job_id, m, None, v, None, "extra-job") for m, v in obs.items()]
            continue
        for metric in sorted(set(exp) | set(obs)):
            cell, o = exp.get(metric), obs.get(metric)
            g, t = (cell["value"], float(cell["tolerance"])) if cell is not None else (None, None)
            if o is None:
                status = "missing-metric"
            elif cell is None:
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
    if data.get("schema") != GOLDEN_SCHEMA:
        raise ValueError(
            f"{path}: golden schema {data.get('schema')} is not {GOLDEN_SCHEMA} (per-cell tolerances); "
            "re-derive it with scripts/derive_golden.py"
        )
    return data


def updated_golden(
    previous: Mapping[str, Any] | None,
    observed: Mapping[str, Mapping[str, float]],
    *,
    dataset: str,
    profile: str,
    environment: Mapping[str, Any],
    eval_sizes: Mapping[str, int | None] | None = None,
    scope: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The golden file after ``--update``: a full run replaces every entry, a filtered one merges.

    One run measures no spread, so the new cells get the rule's floor as their tolerance (and say so:
    no seed or kernel inputs); ``scripts/derive_golden.py`` derives the real ones.
    """
    prev = previous or {}
    rule = ToleranceRule.from_dict(prev.get("rule"))
    results = (
        {} if scope is None else {k: v for k, v in prev.get("results", {}).items() if k not in set(scope)}
    )
    sizes = eval_sizes or {}
    for job_id, metrics in observed.items():
        results[job_id] = {m: rule.cell(float(v), sizes.get(job_id)) for m, v in sorted(metrics.items())}
    return {
        "schema": GOLDEN_SCHEMA,
        "dataset": dataset,
        "profile": profile,
        "rule": rule.to_dict(),
        "results": dict(sorted(results.items())),
        "environment": dict(environment),
        "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_golden(path: str | Path, golden: Mapping[str, Any]) -> None:
    atomic_write_json(Path(path), golden)
