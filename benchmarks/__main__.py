"""Run every benchmark with its defaults, one after another: ``python -m benchmarks``.

One benchmark: ``python -m benchmarks.fakequant_overhead``, ``python -m benchmarks.spdfq_cost`` or
``python -m benchmarks.scale_search_cost``, ``python -m benchmarks.mixed_precision_cost``
(``--help`` for each one's options). Targets are ratios measured in the same run, never wall times.
"""

from __future__ import annotations

import sys

from benchmarks import fakequant_overhead, mixed_precision_cost, scale_search_cost, spdfq_cost

BENCHMARKS = {
    "fakequant_overhead": fakequant_overhead.main,
    "spdfq_cost": spdfq_cost.main,
    "scale_search_cost": scale_search_cost.main,
    "mixed_precision_cost": mixed_precision_cost.main,
}


def main() -> int:
    status = 0
    for name, run in BENCHMARKS.items():
        print(f"== {name}", flush=True)
        sys.argv = [name]  # each benchmark parses its own (default) options
        status |= int(run() or 0)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
